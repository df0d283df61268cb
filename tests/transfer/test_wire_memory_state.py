"""Wire version 3: a Titans memory state after the KV (and the features); versions 1 and 2
unchanged byte for byte; every malformed state description is refused naming its field."""

from __future__ import annotations

import dataclasses
import hashlib

import msgpack
import numpy as np
import pytest
import torch

from raycake.transfer import KVBlockHeader, KVTransferError, pack_kv, unpack_kv
from raycake.transfer.wire import unpack_payload

HASHES = [bytes([i]) * 16 for i in range(2)]


def golden_kv() -> torch.Tensor:
    """Deterministic without an RNG, so the golden bytes below do not depend on torch's."""
    return (
        (torch.arange(2 * 2 * 3 * 4 * 2 * 8, dtype=torch.float32) / 7)
        .reshape(2, 2, 3, 4, 2, 8)
        .to(torch.bfloat16)
    )


def golden_features() -> torch.Tensor:
    return (torch.arange(60, dtype=torch.float32) / 3).reshape(10, 6).to(torch.float16)


def make_state(pending_rows: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """The layout ``MemoryStatePool.read`` returns: float32 weights and momentum, pending rows
    in the model dtype (bfloat16 here), for two memory layers."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for layer in (1, 3):
        for j, shape in enumerate([(2, 8, 16), (2, 16, 8)]):
            state[f"layers.{layer}.weights.{j}"] = torch.randn(shape, generator=gen)
            state[f"layers.{layer}.momentum.{j}"] = torch.randn(shape, generator=gen)
        pending = torch.randn((pending_rows, 32), generator=gen)
        state[f"layers.{layer}.pending"] = pending.to(torch.bfloat16)
    return state


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)  # header order is the sender's order
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


# Captured from the implementation before version 3 existed: headers and payloads of versions
# 1 and 2 must stay exactly these bytes (old receivers read them).
GOLDEN_V1_HEADER = (
    "8ba776657273696f6e01aa6e756d5f6c617965727302aa6e756d5f626c6f636b7303aa626c6f636b5f73697a65"
    "04ac6e756d5f6b765f686561647302a8686561645f64696d08a56474797065a862666c6f61743136ac626c6f63"
    "6b5f68617368657392c41000000000000000000000000000000000c41001010101010101010101010101010101"
    "aa6e756d5f746f6b656e730aa66e6279746573cd0600a8636865636b73756dce252d30cf"
)
GOLDEN_V1_PAYLOAD = "f1f5a35dda6b06cae3e593bcba9111b8"
GOLDEN_V2_HEADER = (
    "8ea776657273696f6e02aa6e756d5f6c617965727302aa6e756d5f626c6f636b7303aa626c6f636b5f73697a65"
    "04ac6e756d5f6b765f686561647302a8686561645f64696d08a56474797065a862666c6f61743136ac626c6f63"
    "6b5f68617368657392c41000000000000000000000000000000000c41001010101010101010101010101010101"
    "aa6e756d5f746f6b656e730aa66e6279746573cd0678a8636865636b73756dce252d30cfac6665617475726573"
    "5f64696d06ae66656174757265735f6474797065a7666c6f61743136b166656174757265735f636865636b7375"
    "6dce613332bb"
)
GOLDEN_V2_PAYLOAD = "6cfc46ea61d37f5a3165f10b6b75190b"


@pytest.mark.parametrize(
    ("features", "header_hex", "payload_digest"),
    [(None, GOLDEN_V1_HEADER, GOLDEN_V1_PAYLOAD), ("yes", GOLDEN_V2_HEADER, GOLDEN_V2_PAYLOAD)],
    ids=["v1", "v2"],
)
def test_versions_1_and_2_are_unchanged_byte_for_byte(features, header_hex, payload_digest):
    header, payload = pack_kv(
        golden_kv(),
        HASHES,
        10,
        with_checksum=True,
        features=None if features is None else golden_features(),
    )
    assert header.to_msgpack().hex() == header_hex
    assert hashlib.blake2b(payload.tobytes(), digest_size=16).hexdigest() == payload_digest
    assert KVBlockHeader.from_msgpack(bytes.fromhex(header_hex)) == header


@pytest.mark.parametrize("with_features", [False, True], ids=["kv+state", "kv+features+state"])
@pytest.mark.parametrize("with_checksum", [False, True], ids=["no-crc", "crc"])
def test_memory_state_round_trip(with_features, with_checksum):
    kv, state = golden_kv(), make_state()
    features = golden_features() if with_features else None
    header, flat = pack_kv(
        kv, HASHES, 10, with_checksum=with_checksum, features=features, memory_state=state
    )
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert header.version == 3 and header.has_memory_state
    assert header.state_nbytes == state_bytes
    assert header.nbytes == flat.nbytes == header.kv_nbytes + header.features_nbytes + state_bytes
    assert (header.state_checksum is not None) == with_checksum
    fields = msgpack.unpackb(header.to_msgpack())
    assert fields["version"] == 3
    assert fields["state_tensors"][0] == ["layers.1.weights.0", "float32", [2, 8, 16]]
    assert fields["features_dim"] == (6 if with_features else None)
    decoded = KVBlockHeader.from_msgpack(header.to_msgpack())
    assert decoded == header
    for payload in (flat, flat.tobytes(), torch.from_numpy(flat)):
        out = unpack_payload(decoded, payload)
        assert torch.equal(out.kv, kv)
        assert (out.features is None) != with_features
        if with_features:
            assert torch.equal(out.features, features)
        assert_same_state(out.memory_state, state)
        assert torch.equal(unpack_kv(decoded, payload), kv)  # the KV alone, all parts checked
    # Zero-copy: every part here sits at an offset its dtype can view.
    out = unpack_payload(decoded, flat)
    for tensor in out.memory_state.values():
        assert np.shares_memory(tensor.view(torch.uint8).numpy(), flat)


def test_a_boundary_state_with_no_pending_rows_round_trips():
    state = make_state(pending_rows=0)
    header, flat = pack_kv(golden_kv(), HASHES, 10, with_checksum=True, memory_state=state)
    assert dict((n, s) for n, _, s in header.state_tensors)["layers.1.pending"] == (0, 32)
    assert_same_state(
        unpack_payload(KVBlockHeader.from_msgpack(header.to_msgpack()), flat).memory_state, state
    )


def test_a_misaligned_state_tensor_arrives_as_a_copy():
    """Odd-sized fp16 features leave the float32 state at an offset no view allows: still
    equal, as a copy; a read-only payload (Ray's zero-copy get) is fine either way."""
    features = torch.ones(9, 3, dtype=torch.float16)  # 54 bytes: 2-aligned, not 4-aligned
    assert (golden_kv().numel() * 2 + 54) % 4 == 2
    state = make_state()
    header, flat = pack_kv(golden_kv(), HASHES, 9, features=features, memory_state=state)
    flat.flags.writeable = False
    out = unpack_payload(header, flat)
    assert_same_state(out.memory_state, state)
    weights = out.memory_state["layers.1.weights.0"]
    assert not np.shares_memory(weights.numpy(), flat)
    moved = unpack_payload(header, flat, device="meta")
    assert all(t.device.type == "meta" for t in moved.memory_state.values())


def test_a_flipped_state_bit_fails_the_state_checksum():
    header, flat = pack_kv(golden_kv(), HASHES, 10, with_checksum=True, memory_state=make_state())
    corrupted = bytearray(flat.tobytes())
    corrupted[header.kv_nbytes + 7] ^= 0x01
    with pytest.raises(KVTransferError, match=r"^state_checksum: payload CRC-32"):
        unpack_payload(header, bytes(corrupted))
    corrupted = bytearray(flat.tobytes())
    corrupted[-1] ^= 0x80  # the last pending row's last byte
    with pytest.raises(KVTransferError, match=r"^state_checksum"):
        unpack_kv(header, bytes(corrupted))
    with pytest.raises(KVTransferError, match=r"^payload: .* bytes"):
        unpack_payload(header, flat[: header.kv_nbytes])  # the KV alone, state missing


def header_fields(**changes):
    header, _ = pack_kv(golden_kv(), HASHES, 10, memory_state=make_state())
    fields = {f.name: getattr(header, f.name) for f in dataclasses.fields(header)}
    fields.update(changes)
    return fields


def specs_with(index: int, **part) -> list[list]:
    """The good state description with entry ``index`` changed (name, dtype or shape)."""
    specs = [list(spec) for spec in header_fields()["state_tensors"]]
    for key, value in part.items():
        specs[index][("name", "dtype", "shape").index(key)] = value
    return specs


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"state_tensors": specs_with(0, name="layé")}, r"^state_tensors\[0\]\.name: .*ASCII"),
        ({"state_tensors": specs_with(0, name="a\nb")}, r"^state_tensors\[0\]\.name: .*ASCII"),
        ({"state_tensors": specs_with(1, name="x" * 129)}, r"^state_tensors\[1\]\.name: .*128"),
        ({"state_tensors": specs_with(1, name="")}, r"^state_tensors\[1\]\.name"),
        ({"state_tensors": specs_with(2, name=7)}, r"^state_tensors\[2\]\.name"),
        (
            {"state_tensors": specs_with(1, name="layers.1.weights.0")},
            r"^state_tensors\[1\]\.name: .* appears twice",
        ),
        ({"state_tensors": specs_with(4, dtype="int8")}, r"^state_tensors\[4\]\.dtype"),
        ({"state_tensors": specs_with(4, dtype=None)}, r"^state_tensors\[4\]\.dtype"),
        ({"state_tensors": specs_with(0, shape=[-1, 16])}, r"^state_tensors\[0\]\.shape\[0\]"),
        ({"state_tensors": specs_with(0, shape=[2, True])}, r"^state_tensors\[0\]\.shape\[1\]"),
        ({"state_tensors": specs_with(0, shape=[2**31, 1])}, r"^state_tensors\[0\]\.shape\[0\]"),
        ({"state_tensors": specs_with(0, shape=[1] * 9)}, r"^state_tensors\[0\]\.shape: 9 dims"),
        ({"state_tensors": specs_with(0, shape="ab")}, r"^state_tensors\[0\]\.shape"),
        ({"state_tensors": [["a", "float32"]]}, r"^state_tensors\[0\]: expected \[name"),
        ({"state_tensors": []}, r"^state_tensors: 0 tensors"),
        ({"state_tensors": "abc"}, r"^state_tensors: expected a list"),
        (
            {"state_tensors": [[f"t{i}", "float32", [1]] for i in range(4097)]},
            r"^state_tensors: 4097 tensors",
        ),
        # Consistent descriptions whose sizes no longer add up to the payload.
        ({"state_tensors": specs_with(0, shape=[2, 8, 17])}, r"^nbytes: .* state tensors"),
        ({"state_tensors": specs_with(0, dtype="bfloat16")}, r"^nbytes"),
        ({"state_checksum": -1}, r"^state_checksum"),
        ({"state_checksum": 2**32}, r"^state_checksum"),
        ({"state_tensors": None, "state_checksum": 5}, r"^state_checksum: set without"),
    ],
)
def test_invalid_state_header_names_the_field(changes, match):
    with pytest.raises(KVTransferError, match=match):
        KVBlockHeader(**header_fields(**changes))


def test_from_msgpack_validates_the_version_3_fields():
    header, _ = pack_kv(golden_kv(), HASHES, 10, memory_state=make_state())
    good = msgpack.unpackb(header.to_msgpack())
    v2, _ = pack_kv(golden_kv(), HASHES, 10, features=golden_features())
    good_v2 = msgpack.unpackb(v2.to_msgpack())
    cases = {
        msgpack.packb({**good, "state_tensors": None}): r"^state_tensors: required by version 3",
        msgpack.packb({k: v for k, v in good.items() if k != "state_checksum"}): "missing fields",
        msgpack.packb({k: v for k, v in good.items() if k != "features_dim"}): "missing fields",
        msgpack.packb({**good_v2, "state_tensors": good["state_tensors"]}): "unknown fields",
        msgpack.packb({**good, "version": 4}): r"^version",
        msgpack.packb({**good, "version": True}): r"^version",
        msgpack.packb({**good, "state_tensors": {"a": 1}}): r"^state_tensors: expected a list",
        msgpack.packb({**good, "state_tensors": [[b"raw", "float32", [1]]]}): r"\[0\]\.name",
    }
    for data, match in cases.items():
        with pytest.raises(KVTransferError, match=match):
            KVBlockHeader.from_msgpack(data)


def test_pack_kv_refuses_a_bad_memory_state():
    kv = golden_kv()
    cases = [
        ({}, r"^memory_state: expected a non-empty dict of tensors, got an empty dict"),
        ([torch.zeros(1)], r"^memory_state: expected a non-empty dict"),
        ({1: torch.zeros(1)}, r"^memory_state\[1\]: expected a string name"),
        ({"w": torch.zeros(2, dtype=torch.int64)}, r"^memory_state\['w'\]: dtype torch.int64"),
        ({"w": [1.0]}, r"^memory_state\['w'\]: expected a torch.Tensor"),
        ({"w": torch.zeros(2, device="meta")}, r"^memory_state\['w'\]: a tensor on device meta"),
        ({"wé": torch.zeros(2)}, r"^memory_state\[0\]\.name: .*ASCII"),
        ({"w": torch.zeros([1] * 9)}, r"^memory_state\[0\]\.shape: 9 dims"),
    ]
    for memory_state, match in cases:
        with pytest.raises(KVTransferError, match=match):
            pack_kv(kv, HASHES, 10, memory_state=memory_state)


def test_non_contiguous_state_tensors_are_staged():
    state = {"w": torch.randn(8, 6)[:, ::2], "p": torch.randn(4, 6).t().to(torch.float16)}
    assert not any(t.is_contiguous() for t in state.values())
    header, flat = pack_kv(golden_kv(), HASHES, 10, memory_state=state)
    assert_same_state(unpack_payload(header, flat).memory_state, state)
