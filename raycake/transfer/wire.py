"""The KV payload on the wire: a msgpack header and the raw bytes of some KV blocks.

A payload holds ``num_blocks`` blocks of every layer as one contiguous tensor:

    L = layers, 2 = (key, value), B = blocks, S = block size (tokens), H = KV heads, D = head dim
    payload: [L, 2, B, S, H, D] in the model dtype

and, optionally, right after those bytes, the target features of the same tokens, which an
EAGLE draft head drafts from (a prompt handed from a prefill to a decode instance):

    N = num_tokens, E = features_dim (the target's hidden size)
    features: [N, E] in ``features_dtype``

The header says exactly what the bytes must be (shape, dtype, size, optional CRC-32 of each
part) and which prefix blocks they are (chained block hashes). ``unpack_kv`` refuses any payload
that does not match it: a bad block is a clear ``KVTransferError``, never silent garbage. Headers
are msgpack, never pickle: a receiver can decode one from an untrusted peer without running its
code. A header without features is version 1, byte for byte what it always was; one with
features is version 2 (an old receiver refuses it by its version instead of misreading it).
``nbytes`` is the whole payload's size, so a transport that moves ``nbytes`` bytes moves both.

Version 3 adds a Titans memory state (``ExportedKV.memory_state``: the memory MLPs' weights and
momentum, float32, and the pending inputs of the chunk being filled, in the model dtype) after
the KV and after the features when there are any:

    payload: [KV bytes | features bytes (optional) | state tensor 0 | state tensor 1 | ...]

The header lists every state tensor as ``[name, dtype, shape]`` in payload order
(``state_tensors``: short printable-ASCII names, unique; dtypes of the same allowed set; shapes
of bounded non-negative ints, a pending chunk may have 0 rows) and the CRC-32 of all their bytes
(``state_checksum``, or None). A version 3 header always carries the feature fields (None
without features). The tensors are packed back to back without padding: a receiver gets
zero-copy views of those whose offset is a multiple of their item size (all of them when the
parts before are, as with a KV and float32 weights), a copy of the others.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np
import torch

WIRE_VERSION = 1  # a payload of KV only
WIRE_VERSION_FEATURES = 2  # KV, then the features of the same tokens
WIRE_VERSION_STATE = 3  # KV, the optional features, then a Titans memory state
BLOCK_HASH_BYTES = 16  # blake2b-128 chained hashes, as raycake.engine.kv_cache.hash_block_tokens
MAX_DIM = 2**31 - 1
MAX_PAYLOAD_BYTES = 2**40  # 1 TiB: refuses a header that would make a receiver allocate absurdly
MAX_HEADER_BYTES = 16 * 2**20
# Bounds of a memory state's description: far above any model's (a few tensors per memory
# layer), low enough that a hostile header cannot make a receiver loop or allocate absurdly.
MAX_STATE_TENSORS = 4096
MAX_STATE_NAME_CHARS = 128
MAX_STATE_DIMS = 8

# dtype name -> (torch dtype, numpy dtype of the array pack_kv returns). numpy has no bfloat16:
# its bits travel as uint16 and the header keeps the name.
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype(np.float32)),
    "bfloat16": (torch.bfloat16, np.dtype(np.uint16)),
    "float16": (torch.float16, np.dtype(np.float16)),
}
_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}
_FIELDS = (
    "num_layers",
    "num_blocks",
    "block_size",
    "num_kv_heads",
    "head_dim",
    "dtype",
    "block_hashes",
    "num_tokens",
    "nbytes",
    "checksum",
)
_FEATURE_FIELDS = ("features_dim", "features_dtype", "features_checksum")
_STATE_FIELDS = ("state_tensors", "state_checksum")
_VERSION_FIELDS = {
    WIRE_VERSION: _FIELDS,
    WIRE_VERSION_FEATURES: _FIELDS + _FEATURE_FIELDS,
    WIRE_VERSION_STATE: _FIELDS + _FEATURE_FIELDS + _STATE_FIELDS,
}

# One memory-state tensor as the header describes it: (name, dtype name, shape).
StateTensorSpec = tuple[str, str, tuple[int, ...]]

KVPayload = np.ndarray | torch.Tensor | bytes | bytearray | memoryview


class KVTransferError(ValueError):
    """A KV header or payload is malformed, or a transfer failed; the message names the field."""


@dataclass(frozen=True)
class KVBlockHeader:
    """What a KV payload is; validated on construction, so every instance is consistent."""

    num_layers: int  # L
    num_blocks: int  # B: blocks in the payload
    block_size: int  # S: tokens per block
    num_kv_heads: int  # H
    head_dim: int  # D
    dtype: str  # "float32" | "bfloat16" | "float16"
    # Chained hashes of the leading full blocks (16 bytes each); a trailing partial block has none.
    block_hashes: tuple[bytes, ...]
    num_tokens: int  # valid tokens across the payload; only the last block may be partial
    nbytes: int  # payload size in bytes: kv_nbytes + features_nbytes
    checksum: int | None = None  # CRC-32 of the KV bytes, or None when not computed
    # The optional features after the KV: [num_tokens, features_dim] of features_dtype, and
    # the CRC-32 of their bytes (None when not computed). All None: no features.
    features_dim: int | None = None
    features_dtype: str | None = None
    features_checksum: int | None = None
    # The optional Titans memory state after those (version 3): each tensor's (name, dtype,
    # shape) in payload order, and the CRC-32 of all their bytes (None when not computed).
    # None: no memory state.
    state_tensors: tuple[StateTensorSpec, ...] | None = None
    state_checksum: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            _check_int(name, getattr(self, name), low=1, high=MAX_DIM)
        if not isinstance(self.dtype, str) or self.dtype not in _DTYPES:
            raise KVTransferError(f"dtype: expected one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.block_hashes, (str, bytes)) or not isinstance(
            self.block_hashes, Sequence
        ):
            raise KVTransferError(
                f"block_hashes: expected a sequence of bytes, got {type(self.block_hashes).__name__}"
            )
        hashes = tuple(self.block_hashes)
        for i, block_hash in enumerate(hashes):
            if not isinstance(block_hash, bytes) or len(block_hash) != BLOCK_HASH_BYTES:
                raise KVTransferError(
                    f"block_hashes[{i}]: expected {BLOCK_HASH_BYTES} bytes, got {block_hash!r:.60}"
                )
        if len(hashes) > self.num_blocks:
            raise KVTransferError(
                f"block_hashes: {len(hashes)} hashes for num_blocks={self.num_blocks}"
            )
        object.__setattr__(self, "block_hashes", hashes)
        capacity = self.num_blocks * self.block_size
        _check_int("num_tokens", self.num_tokens, low=capacity - self.block_size + 1, high=capacity)
        if self.features_dim is None:
            for name in ("features_dtype", "features_checksum"):
                if getattr(self, name) is not None:
                    raise KVTransferError(f"{name}: set without features_dim")
        else:
            _check_int("features_dim", self.features_dim, low=1, high=MAX_DIM)
            if not isinstance(self.features_dtype, str) or self.features_dtype not in _DTYPES:
                raise KVTransferError(
                    f"features_dtype: expected one of {sorted(_DTYPES)}, got "
                    f"{self.features_dtype!r}"
                )
            if self.features_checksum is not None:
                _check_int("features_checksum", self.features_checksum, low=0, high=2**32 - 1)
        if self.state_tensors is None:
            if self.state_checksum is not None:
                raise KVTransferError("state_checksum: set without state_tensors")
        else:
            object.__setattr__(self, "state_tensors", _checked_state_specs(self.state_tensors))
            if self.state_checksum is not None:
                _check_int("state_checksum", self.state_checksum, low=0, high=2**32 - 1)
        _check_int("nbytes", self.nbytes, low=1, high=MAX_PAYLOAD_BYTES)
        expected = self.kv_nbytes + self.features_nbytes + self.state_nbytes
        if self.nbytes != expected:
            what = f"shape {self.shape} of {self.dtype}"
            if self.features_shape is not None:
                what += f" and features {self.features_shape} of {self.features_dtype}"
            if self.state_tensors is not None:
                what += f" and {len(self.state_tensors)} state tensors of {self.state_nbytes} bytes"
            raise KVTransferError(f"nbytes: {self.nbytes} != {expected} for {what}")
        if self.checksum is not None:
            _check_int("checksum", self.checksum, low=0, high=2**32 - 1)

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """[L, 2, B, S, H, D]."""
        return (
            self.num_layers,
            2,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype][0]

    @property
    def numpy_dtype(self) -> np.dtype:
        """The dtype of the array pack_kv returns (uint16 for bfloat16)."""
        return _DTYPES[self.dtype][1]

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][1].itemsize

    @property
    def num_tokens_in_last_block(self) -> int:
        return self.num_tokens - (self.num_blocks - 1) * self.block_size

    @property
    def kv_nbytes(self) -> int:
        """The KV part of the payload: prod(shape) * itemsize bytes, first."""
        return math.prod(self.shape) * self.itemsize

    @property
    def has_features(self) -> bool:
        return self.features_dim is not None

    @property
    def features_shape(self) -> tuple[int, int] | None:
        """[num_tokens, features_dim], or None without features."""
        return None if self.features_dim is None else (self.num_tokens, self.features_dim)

    @property
    def features_nbytes(self) -> int:
        """The features part of the payload, after the KV (0 without features)."""
        if self.features_dim is None or self.features_dtype not in _DTYPES:
            return 0
        return self.num_tokens * self.features_dim * _DTYPES[self.features_dtype][1].itemsize

    @property
    def has_memory_state(self) -> bool:
        return self.state_tensors is not None

    @property
    def state_nbytes(self) -> int:
        """The memory-state part of the payload, after the features (0 without a state)."""
        if self.state_tensors is None:
            return 0
        return sum(_spec_nbytes(spec) for spec in self.state_tensors)

    @property
    def version(self) -> int:
        """The wire version this header is sent as: the oldest that can describe it."""
        if self.has_memory_state:
            return WIRE_VERSION_STATE
        return WIRE_VERSION_FEATURES if self.has_features else WIRE_VERSION

    def to_msgpack(self) -> bytes:
        version = self.version
        # NOTE: field order is part of the bytes: versions 1 and 2 stay exactly as they were.
        fields = {name: getattr(self, name) for name in _VERSION_FIELDS[version]}
        fields["block_hashes"] = list(self.block_hashes)
        if self.state_tensors is not None:
            fields["state_tensors"] = [
                [name, dtype, list(shape)] for name, dtype, shape in self.state_tensors
            ]
        return msgpack.packb({"version": version, **fields}, use_bin_type=True)

    @classmethod
    def from_msgpack(cls, data: bytes | bytearray | memoryview) -> KVBlockHeader:
        """Decode and validate a header; anything unexpected raises KVTransferError."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise KVTransferError(f"header: expected bytes, got {type(data).__name__}")
        if len(data) > MAX_HEADER_BYTES:
            raise KVTransferError(f"header: {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            # NOTE: unpackb caps every container and string at the input's length.
            fields = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise KVTransferError(f"header: not valid msgpack ({exc})") from exc
        if not isinstance(fields, dict):
            raise KVTransferError(f"header: expected a map, got {type(fields).__name__}")
        version = fields.pop("version", None)
        if isinstance(version, bool) or version not in _VERSION_FIELDS:
            raise KVTransferError(
                f"version: expected one of {sorted(_VERSION_FIELDS)}, got {version!r:.40}"
            )
        expected = _VERSION_FIELDS[version]
        missing = [name for name in expected if name not in fields]
        unknown = sorted(str(name) for name in fields if name not in expected)
        if missing or unknown:
            raise KVTransferError(
                f"header: missing fields {missing}, unknown fields {unknown} for version {version}"
            )
        if not isinstance(fields["block_hashes"], list):
            raise KVTransferError("block_hashes: expected a list of bytes")
        if version == WIRE_VERSION_FEATURES and fields["features_dim"] is None:
            raise KVTransferError(f"features_dim: required by version {version}, got None")
        if version == WIRE_VERSION_STATE and fields["state_tensors"] is None:
            raise KVTransferError(f"state_tensors: required by version {version}, got None")
        return cls(**fields)


class UnpackedKV(NamedTuple):
    """What a payload holds: the KV, and the features when its header describes them."""

    kv: torch.Tensor  # [L, 2, B, S, H, D]
    features: torch.Tensor | None  # [num_tokens, features_dim], or None
    # The Titans memory state by tensor name, in header order (``MemoryStatePool.read``'s
    # layout), or None when the header describes none.
    memory_state: dict[str, torch.Tensor] | None = None


def pack_kv(
    kv: torch.Tensor,
    block_hashes: Sequence[bytes],
    num_tokens: int,
    with_checksum: bool = False,
    *,
    features: torch.Tensor | None = None,
    memory_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[KVBlockHeader, np.ndarray]:
    """Header and host (numpy) payload of a [L, 2, B, S, H, D] KV tensor on any device, and
    optionally the [num_tokens, E] features of the same tokens (``ExportedKV.features``) and a
    Titans memory state (``ExportedKV.memory_state``, tensors by name; version 3).

    A tensor on an accelerator is staged to host memory here (one device-to-host copy: the
    bytes must be in host memory to be published). KV alone: the array is typed (bfloat16 as
    its uint16 bits), and zero-copy when ``kv`` is a contiguous CPU tensor (it shares the
    memory: don't modify ``kv`` while the payload is published). With features or a memory
    state: one flat uint8 array, the KV bytes, the features bytes, then each state tensor's
    bytes (a copy).
    """
    kv = _host_tensor("kv", kv)
    if kv.dim() != 6 or kv.shape[1] != 2:
        raise KVTransferError(f"kv: expected shape [L, 2, B, S, H, D], got {tuple(kv.shape)}")
    array = _typed_array(kv)
    num_layers, _, num_blocks, block_size, num_kv_heads, head_dim = kv.shape
    fields: dict[str, Any] = {}
    feature_array = None
    if features is not None:
        features = _host_tensor("features", features)
        if features.dim() != 2 or features.shape[0] != num_tokens:
            raise KVTransferError(
                f"features: expected shape [num_tokens={num_tokens}, E], got "
                f"{tuple(features.shape)}"
            )
        feature_array = _typed_array(features)
        fields = {
            "features_dim": features.shape[1],
            "features_dtype": _DTYPE_NAMES[features.dtype],
            "features_checksum": (zlib.crc32(_byte_view(feature_array)) if with_checksum else None),
        }
    state_arrays: list[np.ndarray] = []
    if memory_state is not None:
        specs, state_arrays = _state_arrays(memory_state)
        state_checksum = None
        if with_checksum:
            state_checksum = 0
            for state_array in state_arrays:  # incremental: the CRC of the bytes back to back
                state_checksum = zlib.crc32(_byte_view(state_array), state_checksum)
        fields.update(state_tensors=specs, state_checksum=state_checksum)
    parts = [array, *([] if feature_array is None else [feature_array]), *state_arrays]
    header = KVBlockHeader(
        num_layers=num_layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=_DTYPE_NAMES[kv.dtype],
        block_hashes=tuple(block_hashes),
        num_tokens=num_tokens,
        nbytes=sum(part.nbytes for part in parts),
        checksum=zlib.crc32(_byte_view(array)) if with_checksum else None,
        **fields,
    )
    if len(parts) == 1:
        return header, array
    flat = np.empty(header.nbytes, dtype=np.uint8)  # [KV | features | state tensors...]
    offset = 0
    for part in parts:
        flat[offset : offset + part.nbytes] = _byte_view(part)
        offset += part.nbytes
    return header, flat


def unpack_kv(
    header: KVBlockHeader, payload: KVPayload, device: torch.device | str | None = None
) -> torch.Tensor:
    """The [L, 2, B, S, H, D] tensor of ``header.dtype`` that ``payload`` holds, after checks
    (of the features too, when the header describes them; ``unpack_payload`` returns them).

    ``payload`` is either typed (a numpy array or tensor of the header's dtype and shape; for
    bfloat16 also uint16 bits) or raw (bytes-like, or a 1-D uint8 array/tensor) of exactly
    ``header.nbytes`` bytes; a payload with features is always raw. Without ``device``:
    zero-copy, the result shares the payload's memory (on the payload's device), and is
    read-only when the payload is (e.g. a Ray object store view): copy it before writing in
    place. With ``device``: a copy on that device.
    """
    return unpack_payload(header, payload, device).kv


def unpack_payload(
    header: KVBlockHeader, payload: KVPayload, device: torch.device | str | None = None
) -> UnpackedKV:
    """The KV and (when the header describes them) the features and the memory state that
    ``payload`` holds, after the checks of ``unpack_kv``; on ``device`` when given (else
    zero-copy views, except state tensors at an offset their dtype cannot view: copies)."""
    if not isinstance(header, KVBlockHeader):
        raise KVTransferError(f"header: expected KVBlockHeader, got {type(header).__name__}")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = np.frombuffer(payload, dtype=np.uint8)
    if isinstance(payload, np.ndarray):
        _check_payload_layout(header, payload.nbytes, str(payload.dtype), payload.shape)
        if not payload.flags.c_contiguous:
            raise KVTransferError("payload: numpy array is not C-contiguous")
        with warnings.catch_warnings():
            # A read-only buffer (Ray's zero-copy get) stays read-only; see the docstring.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            tensor = torch.from_numpy(payload)
    elif isinstance(payload, torch.Tensor):
        dtype_name = _DTYPE_NAMES.get(payload.dtype, str(payload.dtype).removeprefix("torch."))
        nbytes = payload.numel() * payload.element_size()
        _check_payload_layout(header, nbytes, dtype_name, tuple(payload.shape))
        if not payload.is_contiguous():
            raise KVTransferError("payload: tensor is not contiguous")
        tensor = payload.detach()
    else:
        raise KVTransferError(f"payload: unsupported type {type(payload).__name__}")
    raw = tensor.reshape(-1).view(torch.uint8)  # [nbytes]
    # [KV | features | state]: each part's bytes, sizes from the header (checked to add up).
    features_end = header.kv_nbytes + header.features_nbytes
    kv_raw, feature_raw = raw[: header.kv_nbytes], raw[header.kv_nbytes : features_end]
    _check_crc("checksum", kv_raw, header.checksum)
    kv = kv_raw.view(header.torch_dtype).reshape(header.shape)  # [L, 2, B, S, H, D]
    features = None
    if header.features_shape is not None and header.features_dtype is not None:
        _check_crc("features_checksum", feature_raw, header.features_checksum)
        # NOTE: a zero-copy view: the KV part is a multiple of 4 bytes (its [L, 2, ...] shape
        # has an even element count of a 2- or 4-byte dtype), so the features stay aligned.
        feature_dtype = _DTYPES[header.features_dtype][0]
        features = feature_raw.view(feature_dtype).reshape(header.features_shape)  # [N, E]
    memory_state = None
    if header.state_tensors is not None:
        state_raw = raw[features_end:]
        _check_crc("state_checksum", state_raw, header.state_checksum)
        memory_state = _state_views(header.state_tensors, state_raw)
    if device is not None:
        kv = kv.to(device)
        features = None if features is None else features.to(device)
        if memory_state is not None:
            memory_state = {name: t.to(device) for name, t in memory_state.items()}
    return UnpackedKV(kv, features, memory_state)


def check_payload(header: KVBlockHeader, payload: KVPayload) -> None:
    """Raise KVTransferError unless ``payload`` matches ``header`` (size, dtype, shape, CRC)."""
    unpack_kv(header, payload)


def payload_bytes(payload: np.ndarray | torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a CPU payload (no copy)."""
    if isinstance(payload, torch.Tensor):
        if payload.device.type != "cpu":
            raise KVTransferError(f"payload: expected a CPU tensor, got device {payload.device}")
        payload = payload.detach().reshape(-1).view(torch.uint8).numpy()
    if not isinstance(payload, np.ndarray) or not payload.flags.c_contiguous:
        raise KVTransferError("payload: expected a C-contiguous numpy array or CPU tensor")
    return payload.reshape(-1).view(np.uint8)


def _check_payload_layout(
    header: KVBlockHeader, nbytes: int, dtype_name: str, shape: tuple[int, ...]
) -> None:
    if nbytes != header.nbytes:
        raise KVTransferError(f"payload: {nbytes} bytes, header says nbytes={header.nbytes}")
    if dtype_name == "uint8" and len(shape) == 1:
        return  # raw bytes: the header alone says how to read them
    allowed = {header.dtype, str(header.numpy_dtype)}
    if dtype_name not in allowed:
        raise KVTransferError(f"payload: dtype {dtype_name}, header says dtype={header.dtype}")
    if tuple(shape) != header.shape:
        raise KVTransferError(f"payload: shape {tuple(shape)}, header says {header.shape}")


def _host_tensor(name: str, tensor: object) -> torch.Tensor:
    """A contiguous CPU copy (or the tensor itself, when it already is one) of a tensor on any
    device, after checking its dtype travels."""
    if not isinstance(tensor, torch.Tensor):
        raise KVTransferError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _DTYPE_NAMES:
        raise KVTransferError(f"{name}: dtype {tensor.dtype} not one of {sorted(_DTYPES)}")
    if tensor.device.type == "meta":
        raise KVTransferError(f"{name}: a tensor on device meta has no bytes to send")
    return tensor.detach().cpu().contiguous()


def _typed_array(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor (bfloat16 as its uint16 bits)."""
    return (tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _state_arrays(
    memory_state: Mapping[str, torch.Tensor],
) -> tuple[tuple[StateTensorSpec, ...], list[np.ndarray]]:
    """The header's description and the host arrays of a memory state, in the dict's order."""
    if not isinstance(memory_state, Mapping) or not memory_state:
        what = "an empty dict" if isinstance(memory_state, Mapping) else type(memory_state).__name__
        raise KVTransferError(f"memory_state: expected a non-empty dict of tensors, got {what}")
    specs: list[StateTensorSpec] = []
    arrays: list[np.ndarray] = []
    for name, tensor in memory_state.items():
        label = f"memory_state[{name!r:.60}]"
        if not isinstance(name, str):
            raise KVTransferError(f"{label}: expected a string name, got {type(name).__name__}")
        tensor = _host_tensor(label, tensor)
        specs.append((name, _DTYPE_NAMES[tensor.dtype], tuple(tensor.shape)))
        arrays.append(_typed_array(tensor))
    # The checks a receiver runs on the header: a bad name fails here, at the sender, already.
    return _checked_state_specs(specs, field="memory_state"), arrays


def _checked_state_specs(
    specs: object, field: str = "state_tensors"
) -> tuple[StateTensorSpec, ...]:
    """``specs`` as a tuple of (name, dtype, shape) after checking every part of every entry
    (``field`` names where they came from in errors)."""
    if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence):
        raise KVTransferError(
            f"{field}: expected a list of [name, dtype, shape], got {type(specs).__name__}"
        )
    if not 1 <= len(specs) <= MAX_STATE_TENSORS:
        raise KVTransferError(f"{field}: {len(specs)} tensors outside [1, {MAX_STATE_TENSORS}]")
    checked: list[StateTensorSpec] = []
    names: set[str] = set()
    for i, spec in enumerate(specs):
        where = f"{field}[{i}]"
        if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or len(spec) != 3:
            raise KVTransferError(f"{where}: expected [name, dtype, shape], got {spec!r:.60}")
        name, dtype, shape = spec
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_STATE_NAME_CHARS:
            raise KVTransferError(
                f"{where}.name: expected a string of 1 to {MAX_STATE_NAME_CHARS} characters, "
                f"got {name!r:.60}"
            )
        if not (name.isascii() and name.isprintable()):
            raise KVTransferError(f"{where}.name: expected printable ASCII, got {name!r:.60}")
        if name in names:
            raise KVTransferError(f"{where}.name: {name!r} appears twice")
        names.add(name)
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise KVTransferError(
                f"{where}.dtype: expected one of {sorted(_DTYPES)}, got {dtype!r:.40}"
            )
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise KVTransferError(f"{where}.shape: expected a list of ints, got {shape!r:.60}")
        if len(shape) > MAX_STATE_DIMS:
            raise KVTransferError(f"{where}.shape: {len(shape)} dims exceed {MAX_STATE_DIMS}")
        for d, size in enumerate(shape):
            _check_int(f"{where}.shape[{d}]", size, low=0, high=MAX_DIM)
        checked.append((name, dtype, tuple(shape)))
    return tuple(checked)


def _spec_nbytes(spec: StateTensorSpec) -> int:
    _, dtype, shape = spec
    return math.prod(shape) * _DTYPES[dtype][1].itemsize


def _state_views(specs: tuple[StateTensorSpec, ...], raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each state tensor in ``raw`` (their bytes back to back; the total was checked against
    the header's nbytes): a view where its offset suits its dtype, else a copy."""
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in specs:
        name, dtype, shape = spec
        torch_dtype, numpy_dtype = _DTYPES[dtype]
        size = _spec_nbytes(spec)
        part = raw[offset : offset + size]
        if part.storage_offset() % numpy_dtype.itemsize:
            # Packed without padding: after an odd number of 2-byte elements a float32 tensor
            # sits at an offset no dtype view allows, so it gets its own (aligned) copy.
            part = part.clone()
        tensors[name] = part.view(torch_dtype).reshape(shape)
        offset += size
    return tensors


def _check_crc(name: str, raw: torch.Tensor, expected: int | None) -> None:
    if expected is None:
        return
    actual = zlib.crc32(_byte_view(raw.cpu().numpy()))
    if actual != expected:
        raise KVTransferError(f"{name}: payload CRC-32 {actual:#010x} != header {expected:#010x}")


def _byte_view(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8))


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KVTransferError(f"{name}: expected an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise KVTransferError(f"{name}: {value} outside [{low}, {high}]")
