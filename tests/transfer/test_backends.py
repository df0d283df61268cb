"""Every KV transfer backend between two real Ray actors: bytes arrive intact, bad handles fail."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import re
import time

import msgpack
import numpy as np
import pytest
import ray
import torch

from raycake.transfer import KVBlockHeader, KVHandle, KVTransferError, make_kv_transfer, pack_kv
from raycake.transfer.ray_direct import (
    RAY_DIRECT_ACTOR_OPTIONS,
    RayDirectKVEndpoint,
    RayDirectTransfer,
    connect_ray_direct,
)

HAS_MOONCAKE = importlib.util.find_spec("mooncake") is not None
BACKENDS = [
    "object_store",
    "ray_direct",
    pytest.param(
        "mooncake",
        marks=pytest.mark.skipif(
            not HAS_MOONCAKE, reason="mooncake-transfer-engine-non-cuda is not installed"
        ),
    ),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPE = (2, 2, 3, 4, 2, 8)  # [L, 2, B, S, H, D]


def make_kv(dtype: str, seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(DTYPES[dtype])


def make_state(seed: int) -> dict[str, torch.Tensor]:
    """A Titans memory state as ``MemoryStatePool.read`` lays it out: float32 weights and
    momentum, 3 pending rows in the model dtype."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for j, shape in enumerate([(2, 8, 16), (2, 16, 8)]):
        state[f"layers.1.weights.{j}"] = torch.randn(shape, generator=generator)
        state[f"layers.1.momentum.{j}"] = torch.randn(shape, generator=generator)
    state["layers.1.pending"] = torch.randn((3, 32), generator=generator).to(torch.bfloat16)
    return state


@ray.remote(**RAY_DIRECT_ACTOR_OPTIONS)
class KVPeer(RayDirectKVEndpoint):
    """A stand-in for a prefill/decode instance: one transfer object per backend."""

    def __init__(self, backends: list[str], owner: ray.actor.ActorHandle | None = None):
        options = {"ray_direct": {"endpoint": self}, "object_store": {"owner": owner}}
        self.transfers = {
            name: make_kv_transfer(name, **options.get(name, {})) for name in backends
        }

    def publish(
        self, backend: str, dtype: str, seed: int, shape=SHAPE, checksum=False, as_tensor=False
    ) -> KVHandle:
        """``as_tensor``: publish the torch tensor itself rather than pack_kv's numpy array."""
        kv = make_kv(dtype, seed, shape)
        hashes = [bytes([i]) * 16 for i in range(shape[2] - 1)]
        header, array = pack_kv(
            kv, hashes, num_tokens=shape[2] * shape[3] - 1, with_checksum=checksum
        )
        return self.transfers[backend].publish(header, kv if as_tensor else array)

    def publish_state(self, backend: str, seed: int, corrupt_after_publish: bool = False):
        """A KV with a memory state (wire version 3, checksummed). ``corrupt_after_publish``:
        flip a state bit in the published memory, as a fault in transit would (only backends
        that serve fetches from the sender's memory send it)."""
        header, flat = pack_kv(
            make_kv("bfloat16", seed),
            [bytes([i]) * 16 for i in range(SHAPE[2] - 1)],
            num_tokens=SHAPE[2] * SHAPE[3] - 1,
            with_checksum=True,
            memory_state=make_state(seed),
        )
        handle = self.transfers[backend].publish(header, flat)
        if corrupt_after_publish:
            flat[-1] ^= 0x01
        return handle

    def fetch_state_equal(self, backend: str, handle: KVHandle, seed: int) -> bool:
        out = self.transfers[backend].fetch(handle)
        expected = make_state(seed)
        return (
            torch.equal(out.kv, make_kv("bfloat16", seed))
            and list(out.memory_state) == list(expected)
            and all(torch.equal(out.memory_state[k], v) for k, v in expected.items())
        )

    def fetch_equal(
        self, backend: str, handle: KVHandle, dtype: str, seed: int, shape=SHAPE
    ) -> bool:
        kv = self.transfers[backend].fetch(handle).kv
        return kv.dtype == DTYPES[dtype] and torch.equal(kv, make_kv(dtype, seed, shape))

    def fetch_error(self, backend: str, handle: KVHandle) -> str:
        """'ok', or 'KVTransferError: <message>' (any other exception propagates)."""
        try:
            self.transfers[backend].fetch(handle)
        except KVTransferError as exc:
            return f"KVTransferError: {exc}"
        return "ok"

    def release(self, backend: str, handle: KVHandle) -> int:
        self.transfers[backend].release(handle)
        return self.transfers[backend].num_published


@pytest.fixture(scope="module")
def peers(ray_cluster):
    backends = ["object_store", "ray_direct"] + (["mooncake"] if HAS_MOONCAKE else [])
    sender, receiver = KVPeer.remote(backends), KVPeer.remote(backends)
    coordinator = connect_ray_direct([sender, receiver], transport="gloo")
    yield sender, receiver
    for actor in (sender, receiver, coordinator):
        ray.kill(actor)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_arrive_intact(peers, backend, dtype):
    sender, receiver = peers
    handle = ray.get(sender.publish.remote(backend, dtype, seed=7))
    assert handle.backend == backend and handle.kv_header().dtype == dtype
    assert ray.get(receiver.fetch_equal.remote(backend, handle, dtype, 7))
    assert ray.get(sender.fetch_equal.remote(backend, handle, dtype, 7))  # from itself too
    assert ray.get(sender.release.remote(backend, handle)) == 0


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_object_store_takes_a_tensor_payload(peers, dtype):
    sender, receiver = peers
    handle = ray.get(sender.publish.remote("object_store", dtype, seed=8, as_tensor=True))
    assert ray.get(receiver.fetch_equal.remote("object_store", handle, dtype, 8))
    ray.get(sender.release.remote("object_store", handle))


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "tensor"])
def test_object_store_puts_a_view_of_the_payload_beside_its_header(monkeypatch, as_tensor):
    """What publish hands ray.put: the header's msgpack and the caller's own memory as numpy (no
    copy, no conversion of the bytes), which Ray then writes once, out of band."""
    values = []
    monkeypatch.setattr(ray, "put", lambda value: values.append(value) or "ref")
    kv = make_kv("bfloat16", seed=3)
    header, array = pack_kv(kv, [], num_tokens=SHAPE[2] * SHAPE[3])
    handle = make_kv_transfer("object_store").publish(header, kv if as_tensor else array)
    [(header_bytes, payload)] = values
    assert header_bytes == handle.header == header.to_msgpack()
    assert type(payload) is np.ndarray and payload.dtype == np.uint16 and payload.shape == SHAPE
    assert payload.ctypes.data == kv.data_ptr() and payload.nbytes == kv.numel() * 2


def tampered(handle: KVHandle, **changes) -> KVHandle:
    header = handle.kv_header()
    fields = {f.name: getattr(header, f.name) for f in dataclasses.fields(header)}
    fields.update(changes)
    return dataclasses.replace(handle, header=KVBlockHeader(**fields).to_msgpack())


@pytest.mark.parametrize("backend", BACKENDS)
def test_tampered_handle_fails(peers, backend):
    sender, receiver = peers
    handle = ray.get(sender.publish.remote(backend, "float32", seed=1, checksum=True))
    L, _, B, S, H, D = SHAPE
    bad_handles = {
        # Same byte count, other shape: only the header sent with the bytes can tell.
        "swapped dims": tampered(handle, num_kv_heads=D, head_dim=H),
        "other hashes": tampered(handle, block_hashes=[b"\xff" * 16]),
        "fewer blocks": tampered(
            handle, num_blocks=B - 1, num_tokens=(B - 1) * S, nbytes=L * 2 * (B - 1) * S * H * D * 4
        ),
        "not msgpack": dataclasses.replace(handle, header=b"\x00garbage"),
        "other backend": dataclasses.replace(handle, backend="elsewhere"),
    }
    errors = ray.get([receiver.fetch_error.remote(backend, h) for h in bad_handles.values()])
    for what, error in zip(bad_handles, errors, strict=True):
        assert error.startswith("KVTransferError"), (what, error)
    assert ray.get(receiver.fetch_error.remote(backend, handle)) == "ok"
    ray.get(sender.release.remote(backend, handle))


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_state_arrives_intact(peers, backend):
    sender, receiver = peers
    handle = ray.get(sender.publish_state.remote(backend, seed=11))
    assert handle.kv_header().version == 3
    assert ray.get(receiver.fetch_state_equal.remote(backend, handle, 11))
    assert ray.get(sender.release.remote(backend, handle)) == 0


def with_state_specs(handle: KVHandle, index: int, **part) -> KVHandle:
    """The handle with state tensor ``index``'s name, dtype or shape changed, packed as raw
    msgpack (so even a description KVBlockHeader would refuse to build can be sent)."""
    fields = msgpack.unpackb(handle.header)
    for key, value in part.items():
        fields["state_tensors"][index][("name", "dtype", "shape").index(key)] = value
    return dataclasses.replace(handle, header=msgpack.packb(fields, use_bin_type=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tampered_state_header_fails_naming_the_field(peers, backend):
    sender, receiver = peers
    handle = ray.get(sender.publish_state.remote(backend, seed=12))
    bad_handles = {
        # Same byte count, another layout: only the header sent with the bytes can tell.
        "transposed weights": (with_state_specs(handle, 0, shape=[2, 16, 8]), "header: the"),
        "other name": (with_state_specs(handle, 0, name="layers.2.weights.0"), "header: the"),
        # A shorter header: mooncake's locator, which records the header's length, refuses it
        # before the header comparison does.
        "other checksum": (
            tampered(handle, state_checksum=1),
            "header: the|locator: header_length",
        ),
        "non-ASCII name": (with_state_specs(handle, 1, name="layers.1.momentüm.0"), r"\[1\]\.name"),
        "int dtype": (with_state_specs(handle, 4, dtype="int8"), r"\[4\]\.dtype"),
        "negative dim": (with_state_specs(handle, 2, shape=[2, -16, 8]), r"\[2\]\.shape\[1\]"),
        "bigger state": (with_state_specs(handle, 4, shape=[4, 32]), "^nbytes"),
        "dropped state": (
            dataclasses.replace(
                handle,
                header=msgpack.packb(
                    {**msgpack.unpackb(handle.header), "state_tensors": None}, use_bin_type=True
                ),
            ),
            "^state_tensors: required",
        ),
    }
    errors = ray.get([receiver.fetch_error.remote(backend, h) for h, _ in bad_handles.values()])
    for (what, (_, match)), error in zip(bad_handles.items(), errors, strict=True):
        assert error.startswith("KVTransferError: "), (what, error)
        assert re.search(match, error.removeprefix("KVTransferError: ")), (what, error)
    assert ray.get(receiver.fetch_error.remote(backend, handle)) == "ok"
    ray.get(sender.release.remote(backend, handle))


@pytest.mark.parametrize("backend", ["ray_direct", BACKENDS[2]])
def test_state_bytes_corrupted_in_transit_fail_the_checksum(peers, backend):
    sender, receiver = peers
    handle = ray.get(sender.publish_state.remote(backend, seed=13, corrupt_after_publish=True))
    error = ray.get(receiver.fetch_error.remote(backend, handle))
    assert error.startswith("KVTransferError: state_checksum: payload CRC-32"), error
    ray.get(sender.release.remote(backend, handle))


@pytest.mark.parametrize("backend", ["ray_direct", BACKENDS[2]])
def test_fetch_after_release_fails(peers, backend):
    sender, receiver = peers
    handle = ray.get(sender.publish.remote(backend, "float16", seed=2))
    ray.get(sender.release.remote(backend, handle))
    ray.get(sender.release.remote(backend, handle))  # idempotent
    assert ray.get(receiver.fetch_error.remote(backend, handle)).startswith("KVTransferError")


@pytest.mark.skipif(not HAS_MOONCAKE, reason="mooncake-transfer-engine-non-cuda is not installed")
def test_mooncake_refuses_a_forged_address(peers):
    sender, receiver = peers
    handle = ray.get(sender.publish.remote("mooncake", "float32", seed=3))
    forged = dataclasses.replace(
        handle, locator=dataclasses.replace(handle.locator, address=handle.locator.address + 64)
    )
    assert "failed" in ray.get(receiver.fetch_error.remote("mooncake", forged))
    ray.get(sender.release.remote("mooncake", handle))


def test_ray_direct_opposite_fetches_at_once_do_not_deadlock(peers):
    a, b = peers
    shape = (1, 2, 64, 16, 8, 128)  # 8 MiB of float32: gloo blocks on sends this large
    h_a = ray.get(a.publish.remote("ray_direct", "float32", 4, shape))
    h_b = ray.get(b.publish.remote("ray_direct", "float32", 5, shape))
    for _ in range(3):
        both = [
            b.fetch_equal.remote("ray_direct", h_a, "float32", 4, shape),
            a.fetch_equal.remote("ray_direct", h_b, "float32", 5, shape),
        ]
        assert ray.get(both, timeout=30) == [True, True]
    ray.get([a.release.remote("ray_direct", h_a), b.release.remote("ray_direct", h_b)])


def kill_and_wait(actor: ray.actor.ActorHandle, timeout_s: float = 10.0) -> None:
    """ray.kill returns at once; a call may still get through until the process is gone."""
    ray.kill(actor)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError(f"{actor} still answers {timeout_s} s after ray.kill")


def test_object_store_owner_keeps_blocks_after_the_publisher_dies(peers):
    _, store_shard = peers
    owned_by_shard = KVPeer.remote(["object_store"], owner=store_shard)
    owned_by_self = KVPeer.remote(["object_store"])
    shape = (1, 2, 16, 16, 8, 64)  # 512 KiB: Ray may inline small objects into the handle
    kept = ray.get(owned_by_shard.publish.remote("object_store", "bfloat16", 6, shape))
    lost = ray.get(owned_by_self.publish.remote("object_store", "bfloat16", 6, shape))
    for publisher in (owned_by_shard, owned_by_self):
        kill_and_wait(publisher)
    # The receiver learns of the owner's death asynchronously: poll for the loss first.
    deadline = time.monotonic() + 10
    while ray.get(store_shard.fetch_error.remote("object_store", lost)) == "ok":
        assert time.monotonic() < deadline, "blocks owned by a dead publisher stayed fetchable"
        time.sleep(0.2)
    assert ray.get(store_shard.fetch_equal.remote("object_store", kept, "bfloat16", 6, shape))


@ray.remote(**RAY_DIRECT_ACTOR_OPTIONS)
class AsyncKVPeer(RayDirectKVEndpoint):
    """Like raycake's instance actors: async methods, blocking transfer calls in a thread."""

    def __init__(self):
        self.transfer = make_kv_transfer("ray_direct", endpoint=self)

    async def publish(self, dtype: str, seed: int) -> KVHandle:
        header, array = pack_kv(make_kv(dtype, seed), [], num_tokens=12)
        return self.transfer.publish(header, array)

    async def fetch_equal(self, handle: KVHandle, dtype: str, seed: int) -> bool:
        kv = (await asyncio.to_thread(self.transfer.fetch, handle)).kv
        return torch.equal(kv, make_kv(dtype, seed))


def test_ray_direct_between_async_actors(ray_cluster):
    a, b = AsyncKVPeer.remote(), AsyncKVPeer.remote()
    coordinator = connect_ray_direct([a, b])
    handle = ray.get(a.publish.remote("bfloat16", 9))
    assert ray.get(b.fetch_equal.remote(handle, "bfloat16", 9), timeout=30)
    for actor in (a, b, coordinator):
        ray.kill(actor)


def test_ray_direct_needs_an_actor(ray_cluster):
    transfer = RayDirectTransfer(endpoint=RayDirectKVEndpoint())
    header, array = pack_kv(make_kv("float32", 0), [], num_tokens=12)
    with pytest.raises(KVTransferError, match="inside a Ray actor"):
        transfer.publish(header, array)
    with pytest.raises(TypeError, match="endpoint=self"):
        make_kv_transfer("ray_direct")
