"""KV transfer through Ray's object store (the default backend).

publish ``ray.put``s ``(msgpack header, payload)``: Ray msgpacks the tuple and pickles the numpy
payload with protocol 5, out of band, so the header travels beside the payload's bytes in one
object and the bytes are copied once, straight from the caller's array into shared memory; after
that the caller's buffer is no longer read. fetch ``ray.get``s it: zero-copy (a read-only view of
shared memory) on the same node, one network copy otherwise. numpy, not torch: numpy views travel
through Ray's object store zero-copy, but Ray copies torch tensors on get, which is about 25x
slower for 64 MiB between actors (measured: about 9 ms with numpy, 240-260 ms with torch).

What a publish costs (64 MiB on a 2-core VM, benchmarks/kv_transfer.py): the copy, about a
memcpy, plus about 3 ms that every ``ray.put`` costs; and, where the process writes to a page of
the store for the first time, a page fault (1.8-3.5 us per 4 KiB page, 30-57 ms per 64 MiB: more
than the copy; the store's shared memory is allocated lazily and each process maps a page on
first touch). The store re-uses a freed object's memory, so a process that keeps publishing
mostly writes to pages it has written before and stops faulting; the receiver's first read of
a page faults too (about 5 ms per 64 MiB cold, 1-1.5 ms warm). Releasing each hand-off as soon
as the receiver has it keeps the store's memory hot.
"""

from __future__ import annotations

import uuid

import numpy as np
import ray
import torch

from raycake.transfer.base import KVHandle, KVLostError, check_handle, check_sent_header
from raycake.transfer.wire import (
    KVBlockHeader,
    KVTransferError,
    UnpackedKV,
    check_payload,
    unpack_payload,
)


class ObjectStoreTransfer:
    """``owner``: an actor handle (e.g. a KVStoreShard) that owns every object this instance
    publishes, so the blocks outlive the publishing actor; by default the publisher owns them.

    NOTE: Ray 2.56 removed ``ray.put(..., _owner=...)`` (ray-project/ray#63520: it now raises
    ValueError), so the owner itself puts the payload (through ``__ray_call__``, a Ray
    DeveloperAPI): one actor call and two copies per publish, of the call's argument (Ray puts
    it in the store) and the owner's ``ray.put`` of it. Ownership decides only who may die: Ray
    still frees the object once no handle copy remains anywhere, so the owner (e.g. a store
    shard indexing the blocks) keeps the handles it wants kept.
    """

    name = "object_store"

    def __init__(self, owner: ray.actor.ActorHandle | None = None, timeout_s: float = 60.0):
        self.owner = owner
        self.timeout_s = timeout_s
        # transfer_id -> ObjectRef: the sender's reference, held until release.
        self._published: dict[str, ray.ObjectRef] = {}

    def publish(self, header: KVBlockHeader, payload: np.ndarray | torch.Tensor) -> KVHandle:
        check_payload(header, payload)
        if isinstance(payload, torch.Tensor):
            # Keep the header's typed layout (bfloat16 travels as its uint16 bits). A view for a
            # CPU tensor (check_payload refused a non-contiguous one); an accelerator's is staged.
            payload = payload.detach().cpu()
            if payload.dtype == torch.bfloat16:
                payload = payload.view(torch.uint16)
            payload = payload.numpy()
        header_bytes = header.to_msgpack()
        # NOTE: the payload must stay a numpy array here (a view, not bytes): protocol 5 writes
        # it out of band, in one copy, beside the msgpack'd header.
        value = (header_bytes, payload)
        if self.owner is None:
            ref = ray.put(value)
        else:
            [ref] = ray.get(
                self.owner.__ray_call__.remote(_put_as_owner, value), timeout=self.timeout_s
            )
        transfer_id = uuid.uuid4().hex
        self._published[transfer_id] = ref
        return KVHandle(self.name, transfer_id, header_bytes, locator=ref)

    def fetch(self, handle: KVHandle) -> UnpackedKV:
        header = check_handle(handle, self.name)
        if not isinstance(handle.locator, ray.ObjectRef):
            raise KVTransferError(
                f"locator: expected an ObjectRef, got {type(handle.locator).__name__}"
            )
        try:
            value = ray.get(handle.locator, timeout=self.timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ObjectLostError) as exc:
            raise KVLostError(f"object_store: fetch of {handle.transfer_id} failed: {exc}") from exc
        if not isinstance(value, tuple) or len(value) != 2:
            raise KVTransferError(f"payload: expected (header, array), got {type(value).__name__}")
        sent_header, payload = value
        check_sent_header(handle, sent_header)
        if not isinstance(payload, np.ndarray):
            raise KVTransferError(f"payload: expected a numpy array, got {type(payload).__name__}")
        return unpack_payload(header, payload)

    def release(self, handle: KVHandle) -> None:
        self._published.pop(handle.transfer_id, None)

    @property
    def num_published(self) -> int:
        return len(self._published)


def _put_as_owner(owner: object, value: object) -> list[ray.ObjectRef]:
    """Runs on the owner actor: whoever calls ray.put owns the object. The list keeps Ray from
    resolving the returned ref, so the publisher borrows it."""
    return [ray.put(value)]
