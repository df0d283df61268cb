"""KV transfer over Ray Direct Transport (RDT, alpha in Ray 2.60): gloo on CPU, nccl or nixl on GPU.

RDT moves the torch tensors an actor method returns straight to the actor that receives the
method's ObjectRef as an argument (``@ray.method(tensor_transport=...)``, or ``.options`` per call),
out of band, never through the object store. Measured facts that shape this module (Ray 2.60):

- The method must belong to an actor class declared with ``enable_tensor_transport=True``; gloo and
  nccl also need ``ray.experimental.collective.create_collective_group(actors, backend)`` first.
- Only the process that created the group knows it: calling the method from a member actor fails
  with "Actor(...) does not have tensor transport GLOO available. If using a collective-based
  transport ("nccl" or "gloo"), please create a communicator with
  `ray.experimental.collective.create_collective_group` ...".
- ``ray.get`` of a gloo/nccl ref fails ("ray.get is not allowed on RDT objects using the two-sided
  transport GLOO"); the tensors arrive only as an argument of a task on the receiving actor.
- gloo is two-sided and each actor runs its sends and receives on a single system thread, in the
  order its callers submitted them. When two owners each pull from the other at once, the orders
  cross and both block forever (reproduced: symmetric pulls hung in round 2 of 10).

Hence the design: one ``RayDirectCoordinator`` actor creates the group and owns every transfer,
so all sends and receives are submitted in one global order (10 of 10 symmetric rounds passed). A
raycake actor composes ``RayDirectKVEndpoint`` (two small methods RDT needs) and is declared with
``RAY_DIRECT_ACTOR_OPTIONS``; ``connect_ray_direct(actors)`` builds the coordinator. Then
``RayDirectTransfer.fetch`` on the receiver asks the coordinator to move the payload: the sender's
``rdt_export_kv`` returns it, and RDT delivers it to the receiver's ``rdt_import_kv`` (a separate
concurrency group, so it runs while ``fetch`` waits on the main thread).

Limits: a group is fixed once made (an actor joins at most one group per backend); a hung gloo
transfer cannot be aborted (fetch raises after ``timeout_s`` but that system thread stays stuck);
only gloo was run here, in sync and async actors (64 MiB: 45-80 ms, 0.85-1.5 GB/s, on a busy 2-core
CPU machine; benchmarks/kv_transfer.py). nccl and nixl follow the same path but are untested.
"""

from __future__ import annotations

import threading
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

RAY_DIRECT_TRANSPORTS = ("gloo", "nccl", "nixl")
_COLLECTIVE_BACKENDS = {"gloo": "torch_gloo", "nccl": "nccl"}  # nixl is one-sided: no group

# Options for ``ray.remote`` on an actor class that composes RayDirectKVEndpoint. An actor with
# concurrency groups of its own merges its dict into ``concurrency_groups``.
RAY_DIRECT_ACTOR_OPTIONS = {
    "enable_tensor_transport": True,
    "concurrency_groups": {"kv_export": 1, "kv_import": 1},
}

_STATE_LOCK = threading.Lock()


class _EndpointState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        # transfer_id -> (header bytes, flat uint8 payload): what rdt_export_kv returns
        self.exports: dict[str, tuple[bytes, torch.Tensor]] = {}
        self.inbox: dict[str, tuple[bytes, torch.Tensor]] = {}  # fetch_id -> what arrived
        self.coordinator: ray.actor.ActorHandle | None = None


class RayDirectKVEndpoint:
    """Mixin for an actor class: the two methods RDT calls, plus joining a coordinator.

    A mixin because RDT works on methods of the actor class itself; everything else lives in
    RayDirectTransfer, which the actor builds with ``RayDirectTransfer(endpoint=self)``.
    """

    def _rdt_state(self) -> _EndpointState:
        state = self.__dict__.get("_rdt_endpoint_state")
        if state is None:
            with _STATE_LOCK:
                state = self.__dict__.setdefault("_rdt_endpoint_state", _EndpointState())
        return state

    def rdt_connect(self, coordinator: ray.actor.ActorHandle) -> None:
        """Called by connect_ray_direct: the coordinator that moves this actor's payloads."""
        self._rdt_state().coordinator = coordinator

    @ray.method(concurrency_group="kv_export")
    def rdt_export_kv(self, transfer_id: str) -> tuple[bytes, torch.Tensor]:
        """The published (header, payload); the caller passes ``tensor_transport`` via
        ``.options``. RDT sends the tensor out of band and the header bytes as usual."""
        state = self._rdt_state()
        with state.lock:
            payload = state.exports.get(transfer_id)
        if payload is None:
            raise KVTransferError(
                f"ray_direct: transfer {transfer_id} was released or never published"
            )
        return payload

    @ray.method(concurrency_group="kv_import")
    def rdt_import_kv(self, fetch_id: str, payload: tuple[bytes, torch.Tensor]) -> None:
        """RDT has delivered ``payload`` (the ref was an argument); hand it to the waiting fetch."""
        state = self._rdt_state()
        with state.lock:
            state.inbox[fetch_id] = payload


class RayDirectCoordinator:
    """Owns one group's RDT transfers, so their sends and receives are submitted in one order.

    A plain class; connect_ray_direct runs it as an actor. NOTE: ``move`` returns without waiting,
    so one coordinator is not a throughput bottleneck (about one actor call per fetch).
    """

    def __init__(self, transport: str = "gloo") -> None:
        if transport not in RAY_DIRECT_TRANSPORTS:
            raise ValueError(
                f"transfer.transport: unknown {transport!r}; choose one of {RAY_DIRECT_TRANSPORTS}"
            )
        self.transport = transport

    def connect(self, actors: list[ray.actor.ActorHandle]) -> None:
        backend = _COLLECTIVE_BACKENDS.get(self.transport)
        if backend is not None:
            from ray.experimental.collective import create_collective_group

            create_collective_group(actors, backend=backend)

    def move(
        self,
        sender: ray.actor.ActorHandle,
        transfer_id: str,
        receiver: ray.actor.ActorHandle,
        fetch_id: str,
    ) -> list[ray.ObjectRef]:
        """Submit export on the sender and import on the receiver; the list keeps Ray from
        resolving the returned ref."""
        payload_ref = sender.rdt_export_kv.options(tensor_transport=self.transport).remote(
            transfer_id
        )
        return [receiver.rdt_import_kv.remote(fetch_id, payload_ref)]


def transfer_options(backend: str, actor: object) -> dict[str, object]:
    """Constructor options ``make_kv_transfer(backend, ...)`` needs inside ``actor``."""
    return {"endpoint": actor} if backend == RayDirectTransfer.name else {}


def connect_ray_direct(
    actors: list[ray.actor.ActorHandle], transport: str = "gloo"
) -> ray.actor.ActorHandle:
    """Make the group of ``actors`` (each composing RayDirectKVEndpoint) and its coordinator.

    Call once, from the process that assembles the cluster, with every instance that will send or
    receive; returns the coordinator's handle (keep it alive as long as the actors transfer).
    """
    coordinator = ray.remote(num_cpus=0)(RayDirectCoordinator).remote(transport)
    ray.get(coordinator.connect.remote(actors))
    ray.get([actor.rdt_connect.remote(coordinator) for actor in actors])
    return coordinator


class RayDirectTransfer:
    """KVTransfer over RDT, used inside an actor that composes RayDirectKVEndpoint."""

    name = "ray_direct"

    def __init__(
        self, endpoint: RayDirectKVEndpoint | None = None, timeout_s: float = 60.0
    ) -> None:
        if not isinstance(endpoint, RayDirectKVEndpoint):
            raise TypeError(
                "endpoint: the ray_direct backend needs the actor itself: compose "
                "RayDirectKVEndpoint, declare the class with RAY_DIRECT_ACTOR_OPTIONS and pass "
                f"endpoint=self (got {type(endpoint).__name__})"
            )
        self.endpoint = endpoint
        self.timeout_s = timeout_s

    def publish(self, header: KVBlockHeader, payload: np.ndarray | torch.Tensor) -> KVHandle:
        check_payload(header, payload)
        me = _current_actor()
        if isinstance(payload, np.ndarray):
            payload = torch.from_numpy(payload)
        flat = payload.detach().reshape(-1).view(torch.uint8)  # [nbytes], shares memory
        transfer_id = uuid.uuid4().hex
        header_bytes = header.to_msgpack()
        state = self.endpoint._rdt_state()
        with state.lock:
            state.exports[transfer_id] = (header_bytes, flat)
        return KVHandle(self.name, transfer_id, header_bytes, locator=me)

    def fetch(self, handle: KVHandle) -> UnpackedKV:
        header = check_handle(handle, self.name)
        state = self.endpoint._rdt_state()
        if state.coordinator is None:
            raise KVTransferError(
                "ray_direct: this actor is not connected; call connect_ray_direct"
            )
        sender = handle.locator
        if not isinstance(sender, ray.actor.ActorHandle):
            raise KVTransferError(f"locator: expected an actor handle, got {type(sender).__name__}")
        fetch_id = uuid.uuid4().hex
        try:
            [import_ref] = ray.get(
                state.coordinator.move.remote(
                    sender, handle.transfer_id, _current_actor(), fetch_id
                ),
                timeout=self.timeout_s,
            )
            ray.get(import_ref, timeout=self.timeout_s)
        except ray.exceptions.RayError as exc:
            with state.lock:
                state.inbox.pop(fetch_id, None)
            raise KVLostError(
                f"ray_direct: fetch of {handle.transfer_id} failed: {_last_line(exc)}"
            ) from exc
        with state.lock:
            sent_header, payload = state.inbox.pop(fetch_id)
        check_sent_header(handle, sent_header)
        return unpack_payload(header, payload)

    def release(self, handle: KVHandle) -> None:
        state = self.endpoint._rdt_state()
        with state.lock:
            state.exports.pop(handle.transfer_id, None)

    @property
    def num_published(self) -> int:
        return len(self.endpoint._rdt_state().exports)


def _current_actor() -> ray.actor.ActorHandle:
    try:
        actor = ray.get_runtime_context().current_actor
    except RuntimeError as exc:
        raise KVTransferError("ray_direct: publish and fetch must run inside a Ray actor") from exc
    if actor is None:
        raise KVTransferError("ray_direct: publish and fetch must run inside a Ray actor")
    return actor


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
