"""The one interface every KV transfer backend implements, the handle it hands out, and the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from raycake.transfer.wire import KVBlockHeader, KVTransferError, UnpackedKV


class KVLostError(KVTransferError):
    """The published KV is gone with its publisher (the prefill instance died or restarted):
    not the request's fault, so the driver retries it from a new prefill."""


@dataclass(frozen=True)
class KVHandle:
    """Where a published KV payload can be fetched from: small, travels inside a Ray actor call.

    Ray pickles a handle on its own (trusted) channel; the part a receiver must not trust blindly,
    the description of the bytes, is the msgpack ``header`` that ``fetch`` validates against.
    """

    backend: str  # the KVTransfer.name that published it; fetch refuses another backend's handle
    transfer_id: str  # unique per publish; the sender's key for release
    header: bytes  # KVBlockHeader.to_msgpack(): what the payload must be
    # Backend-specific: an ObjectRef (object_store), the sender actor handle (ray_direct), a
    # MooncakeLocator (mooncake). NOTE: an ObjectRef nested here is not resolved by Ray in transit.
    locator: Any

    def kv_header(self) -> KVBlockHeader:
        """The decoded, validated header (raises KVTransferError if it is malformed)."""
        return KVBlockHeader.from_msgpack(self.header)


@runtime_checkable
class KVTransfer(Protocol):
    """Moves KV payloads (see ``raycake.transfer.wire``) from one process to another.

    Each actor holds one instance; instances are not thread-safe.

    Sender: ``publish(header, payload)`` makes the payload fetchable and returns a ``KVHandle``
    to send to the receiver (or to whoever tells the receiver). Contract on the bytes:

    - NOTE: the caller must not modify ``payload`` between ``publish`` and ``release``: a backend
      may serve every fetch straight from that memory (ray_direct, mooncake) or may have copied it
      (object_store). The backend keeps its own reference, so the caller may drop its reference.
    - ``publish`` checks the payload against the header and raises KVTransferError on a mismatch.
    - ``release(handle)`` ends the sender's hold; it is idempotent. After it, a fetch raises
      KVTransferError (ray_direct, mooncake) or may still succeed while some copy of the handle
      keeps the object alive (object_store: Ray frees the object when the last reference goes,
      and an ``owner`` actor can keep it alive after the publisher exits). A fetch never returns
      wrong bytes.

    Receiver: ``fetch(handle)`` returns an ``UnpackedKV``: the [L, 2, B, S, H, D] tensor of the
    header's dtype and, when the header describes them, the prompt's EAGLE target features
    [tokens, hidden] and a Titans memory state by tensor name (else None), validated by
    ``unpack_payload``; any mismatch or transport failure raises KVTransferError. The receiver
    owns the result; it may be a read-only zero-copy view (object_store on the same node), so
    copy it into the KV cache rather than writing to it. A handle may be fetched several times,
    by several receivers, until it is released.
    """

    name: str

    def publish(self, header: KVBlockHeader, payload: np.ndarray | torch.Tensor) -> KVHandle: ...

    def fetch(self, handle: KVHandle) -> UnpackedKV: ...

    def release(self, handle: KVHandle) -> None: ...


def check_handle(handle: KVHandle, backend: str) -> KVBlockHeader:
    """The handle's header, after checking the handle belongs to ``backend``."""
    if not isinstance(handle, KVHandle):
        raise KVTransferError(f"handle: expected KVHandle, got {type(handle).__name__}")
    if handle.backend != backend:
        raise KVTransferError(
            f"handle: published by backend {handle.backend!r}, fetched with {backend!r}"
        )
    return handle.kv_header()


def check_sent_header(handle: KVHandle, sent_header: object) -> None:
    """Raise unless the header that travelled with the bytes is the handle's header.

    NOTE: every backend ships the sender's header bytes next to the payload. Raw transports
    deliver only a byte count, so without this a handle whose header was altered to another
    shape of the same size would decode into garbage.
    """
    if not isinstance(sent_header, (bytes, bytearray, memoryview)):
        raise KVTransferError(f"header: payload came with {type(sent_header).__name__}, not bytes")
    if bytes(sent_header) != handle.header:
        raise KVTransferError(
            "header: the handle's header differs from the one published with the payload"
        )


BACKENDS = ("mooncake", "object_store", "ray_direct")


def make_kv_transfer(name: str = "object_store", **options: Any) -> KVTransfer:
    """The backend called ``name`` (config field ``transfer.backend``), built with ``options``."""
    if name == "object_store":
        from raycake.transfer.object_store import ObjectStoreTransfer

        return ObjectStoreTransfer(**options)
    if name == "ray_direct":
        from raycake.transfer.ray_direct import RayDirectTransfer

        return RayDirectTransfer(**options)
    if name == "mooncake":
        from raycake.transfer.mooncake import MooncakeTransfer

        return MooncakeTransfer(**options)
    raise ValueError(f"transfer.backend: unknown {name!r}; choose one of {', '.join(BACKENDS)}")
