"""The KV wire format: headers round-trip through msgpack, and every bad payload is refused."""

from __future__ import annotations

import dataclasses
import sys

import msgpack
import numpy as np
import pytest
import torch

from raycake.engine.kv_cache import hash_block_tokens
from raycake.transfer import KVBlockHeader, KVTransferError, make_kv_transfer, pack_kv, unpack_kv
from raycake.transfer.wire import unpack_payload

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPE = (3, 2, 4, 8, 2, 16)  # [L, 2, B, S, H, D]


def make_kv(dtype: torch.dtype, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def chained_hashes(num_blocks: int, block_size: int) -> list[bytes]:
    hashes, parent = [], None
    for block in range(num_blocks):
        parent = hash_block_tokens(
            parent, list(range(block * block_size, (block + 1) * block_size))
        )
        hashes.append(parent)
    return hashes


def packed(dtype=torch.float32, num_tokens=29, with_checksum=False):
    kv = make_kv(dtype)
    header, array = pack_kv(kv, chained_hashes(3, 8), num_tokens, with_checksum=with_checksum)
    return kv, header, array


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip(dtype):
    kv, header, array = packed(dtype)
    assert header.shape == SHAPE and header.nbytes == kv.numel() * kv.element_size()
    assert header.num_tokens_in_last_block == 29 - 24
    assert array.dtype == (
        np.uint16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    )
    assert np.shares_memory(
        array, kv.view(torch.uint16).numpy() if dtype == torch.bfloat16 else kv.numpy()
    )
    decoded = KVBlockHeader.from_msgpack(header.to_msgpack())
    assert decoded == header
    for payload in (
        array,
        array.tobytes(),
        memoryview(array.reshape(-1).view(np.uint8)),
        torch.from_numpy(array),
    ):
        out = unpack_kv(decoded, payload)
        assert out.dtype == dtype and out.shape == SHAPE
        assert torch.equal(out, kv)


def test_checksum_detects_a_flipped_bit():
    kv, header, array = packed(torch.bfloat16, with_checksum=True)
    assert header.checksum is not None
    assert torch.equal(unpack_kv(header, array.tobytes()), kv)
    corrupted = bytearray(array.tobytes())
    corrupted[1000] ^= 0x04
    with pytest.raises(KVTransferError, match="checksum"):
        unpack_kv(header, bytes(corrupted))


def test_non_contiguous_tensor_is_packed_as_a_copy():
    kv = make_kv(torch.float16, shape=(3, 2, 4, 8, 16, 2)).transpose(-1, -2)
    header, array = pack_kv(kv, [], 32)
    assert torch.equal(unpack_kv(header, array), kv)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (lambda a: a.tobytes()[:-1], "payload: .* bytes"),  # truncated
        (lambda a: a.tobytes() + b"\0", "payload: .* bytes"),  # trailing garbage
        (lambda a: a.view(np.int32), "payload: dtype int32"),  # same size, wrong dtype
        (lambda a: a.reshape(3, 2, 4, 8, 16, 2), "payload: shape"),  # same size, wrong shape
        (lambda a: a.astype(np.float64), "payload: .* bytes"),
        (lambda a: a[:, :, :2], "payload: .* bytes"),
        (lambda a: torch.from_numpy(a).to(torch.float16), "payload: .* bytes"),
        (lambda a: [1, 2, 3], "unsupported type"),
    ],
)
def test_mismatched_payload_is_refused(payload, match):
    _, header, array = packed(torch.float32)
    with pytest.raises(KVTransferError, match=match):
        unpack_kv(header, payload(array))


def test_non_contiguous_payload_is_refused():
    _, header, array = packed(torch.float32)
    strided = np.empty((*SHAPE[:-1], 32), np.float32)[..., ::2]
    with pytest.raises(KVTransferError, match="not C-contiguous"):
        unpack_kv(header, strided)
    assert array.flags.c_contiguous


def header_fields(**changes):
    _, header, _ = packed(torch.float32)
    fields = {f.name: getattr(header, f.name) for f in dataclasses.fields(header)}
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"head_dim": True}, "head_dim"),
        ({"block_size": 8.0}, "block_size"),
        ({"dtype": "int8"}, "dtype"),
        ({"dtype": "float16"}, "nbytes"),  # consistent fields but the size no longer matches
        ({"num_blocks": 5}, "num_tokens"),
        ({"num_tokens": 24}, "num_tokens"),  # last block empty
        ({"num_tokens": 33}, "num_tokens"),
        ({"nbytes": 1}, "nbytes"),
        ({"block_hashes": [b"x" * 15]}, r"block_hashes\[0\]"),
        ({"block_hashes": [b"x" * 16] * 5}, "block_hashes"),
        ({"block_hashes": b"x" * 16}, "block_hashes"),
        ({"checksum": -1}, "checksum"),
    ],
)
def test_invalid_header_names_the_field(changes, field):
    with pytest.raises(KVTransferError, match=f"^{field}"):
        KVBlockHeader(**header_fields(**changes))


def test_from_msgpack_validates_everything():
    _, header, _ = packed(torch.float32)
    good = msgpack.unpackb(header.to_msgpack())
    cases = {
        b"\xc1": "header: not valid msgpack",
        header.to_msgpack()[:-3]: "header: not valid msgpack",
        msgpack.packb([1, 2]): "header: expected a map",
        msgpack.packb({**good, "version": 4}): "^version",  # 3 is the memory-state version
        msgpack.packb({**good, "extra": 1}): "unknown fields",
        msgpack.packb({k: v for k, v in good.items() if k != "nbytes"}): "missing fields",
        msgpack.packb({**good, "num_blocks": -1}): "num_blocks",
        msgpack.packb({**good, "block_hashes": "abc"}): "block_hashes",
        msgpack.packb({**good, "nbytes": 2**41}): "nbytes",
    }
    for data, match in cases.items():
        with pytest.raises(KVTransferError, match=match):
            KVBlockHeader.from_msgpack(data)
    with pytest.raises(KVTransferError, match="expected bytes"):
        KVBlockHeader.from_msgpack("text")  # type: ignore[arg-type]


def test_pack_kv_refuses_bad_tensors():
    with pytest.raises(KVTransferError, match="shape"):
        pack_kv(torch.zeros(2, 3, 1, 1, 1, 1), [], 1)
    with pytest.raises(KVTransferError, match="dtype"):
        pack_kv(torch.zeros(1, 2, 1, 1, 1, 1, dtype=torch.int32), [], 1)
    with pytest.raises(KVTransferError, match="num_tokens"):
        pack_kv(torch.zeros(1, 2, 1, 4, 1, 1), [], 0)


def test_registry_names_the_config_field():
    with pytest.raises(ValueError, match=r"transfer.backend: unknown 'nope'.*object_store"):
        make_kv_transfer("nope")
    assert make_kv_transfer().name == "object_store"


def test_mooncake_names_the_missing_package(monkeypatch):
    from raycake.transfer.mooncake import MooncakeTransfer

    monkeypatch.setitem(sys.modules, "mooncake.engine", None)  # import now raises ImportError
    with pytest.raises(KVTransferError, match="mooncake-transfer-engine-non-cuda"):
        _ = MooncakeTransfer().session_id


# ---- EAGLE target features after the KV (version 2), and device-agnostic packing -----------


def make_features(dtype: torch.dtype, num_tokens: int = 29, dim: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn((num_tokens, dim), generator=generator).to(dtype)


@pytest.mark.parametrize(
    ("kv_dtype", "features_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
    ],
    ids=str,
)
def test_features_travel_after_the_kv(kv_dtype, features_dtype):
    kv, features = make_kv(kv_dtype), make_features(features_dtype)
    header, flat = pack_kv(kv, chained_hashes(3, 8), 29, with_checksum=True, features=features)
    kv_bytes = kv.numel() * kv.element_size()
    assert header.has_features and header.features_shape == (29, 24)
    assert header.kv_nbytes == kv_bytes
    assert header.nbytes == flat.nbytes == kv_bytes + features.numel() * features.element_size()
    assert flat.dtype == np.uint8 and flat.ndim == 1
    fields = msgpack.unpackb(header.to_msgpack())
    assert fields["version"] == 2 and fields["features_dim"] == 24
    decoded = KVBlockHeader.from_msgpack(header.to_msgpack())
    assert decoded == header
    for payload in (flat, flat.tobytes(), torch.from_numpy(flat)):
        out = unpack_payload(decoded, payload)
        assert torch.equal(out.kv, kv) and torch.equal(out.features, features)
        assert out.features.dtype == features_dtype
        assert torch.equal(unpack_kv(decoded, payload), kv)  # what a transport's fetch returns


def test_a_payload_without_features_keeps_the_version_1_format():
    kv, header, array = packed(torch.float16, with_checksum=True)
    fields = msgpack.unpackb(header.to_msgpack())
    assert fields["version"] == 1 and not set(fields) & {"features_dim", "features_dtype"}
    assert header.nbytes == header.kv_nbytes and not header.has_features
    out = unpack_payload(KVBlockHeader.from_msgpack(header.to_msgpack()), array)
    assert torch.equal(out.kv, kv) and out.features is None


def test_a_flipped_feature_bit_fails_the_features_checksum():
    features = make_features(torch.float32)
    header, flat = pack_kv(make_kv(torch.float32), [], 29, with_checksum=True, features=features)
    assert header.features_checksum is not None
    corrupted = bytearray(flat.tobytes())
    corrupted[header.kv_nbytes + 5] ^= 0x10
    with pytest.raises(KVTransferError, match=r"^features_checksum: payload CRC-32"):
        unpack_payload(header, bytes(corrupted))
    with pytest.raises(KVTransferError, match=r"^features_checksum"):
        unpack_kv(header, bytes(corrupted))  # a transport's fetch checks the features too


def test_feature_headers_are_validated():
    features = make_features(torch.float32)
    header, flat = pack_kv(make_kv(torch.float32), [], 29, features=features)
    good = msgpack.unpackb(header.to_msgpack())
    cases = {
        msgpack.packb({k: v for k, v in good.items() if k != "features_dtype"}): "missing fields",
        msgpack.packb({**good, "features_dim": None, "features_dtype": None}): "^features_dim",
        msgpack.packb({**good, "version": 1}): "unknown fields",
        msgpack.packb({**good, "features_dtype": "int8"}): "^features_dtype",
        msgpack.packb({**good, "features_dim": 25}): "^nbytes: .* and features",
        msgpack.packb({**good, "features_checksum": -1}): "^features_checksum",
    }
    for data, match in cases.items():
        with pytest.raises(KVTransferError, match=match):
            KVBlockHeader.from_msgpack(data)
    with pytest.raises(KVTransferError, match=r"^features_dtype: set without features_dim"):
        KVBlockHeader(**{**header_fields(), "features_dtype": "float32"})
    with pytest.raises(KVTransferError, match=r"^features: expected shape \[num_tokens=29, E\]"):
        pack_kv(make_kv(torch.float32), [], 29, features=features[:28])
    with pytest.raises(KVTransferError, match=r"^payload: .* bytes"):
        unpack_payload(header, flat[: header.kv_nbytes])  # the KV alone, features missing


def test_pack_kv_stages_any_layout_and_unpack_kv_targets_a_device():
    """Non-contiguous inputs (a transposed KV, a strided features slice) are staged into host
    bytes; ``device`` puts the result where the caller computes (meta here: no accelerator)."""
    kv = make_kv(torch.float16, shape=(3, 2, 4, 8, 16, 2)).transpose(-1, -2)
    features = make_features(torch.float32, dim=48)[:, ::2]
    assert not kv.is_contiguous() and not features.is_contiguous()
    header, flat = pack_kv(kv, [], 29, features=features)
    out = unpack_payload(header, flat)
    assert torch.equal(out.kv, kv) and torch.equal(out.features, features)
    moved = unpack_payload(header, flat, device="meta")
    assert moved.kv.device.type == "meta" and moved.kv.shape == kv.shape
    assert moved.features.device.type == "meta" and moved.features.shape == (29, 24)
    assert unpack_kv(header, flat, device=torch.device("cpu")).device.type == "cpu"
    with pytest.raises(KVTransferError, match=r"^kv: a tensor on device meta has no bytes"):
        pack_kv(torch.zeros(1, 2, 1, 4, 1, 1, device="meta"), [], 4)
    with pytest.raises(KVTransferError, match=r"^features: dtype torch.int64"):
        pack_kv(make_kv(torch.float32), [], 29, features=torch.zeros(29, 2, dtype=torch.long))
