"""The KV payload on the wire: a msgpack header and the raw bytes of some KV blocks.

A payload holds ``num_blocks`` blocks of every layer as one contiguous tensor:

    L = layers, 2 = (key, value), B = blocks, S = block size (tokens), H = KV heads, D = head dim
    payload: [L, 2, B, S, H, D] in the model dtype

The header says exactly what the bytes must be (shape, dtype, size, optional CRC-32) and which
prefix blocks they are (chained block hashes). ``unpack_kv`` refuses any payload that does not match
it: a bad block is a clear ``KVTransferError``, never silent garbage. Headers are msgpack, never
pickle: a receiver can decode one from an untrusted peer without running its code.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

WIRE_VERSION = 1
BLOCK_HASH_BYTES = 16  # blake2b-128 chained hashes, as raycake.engine.kv_cache.hash_block_tokens
MAX_DIM = 2**31 - 1
MAX_PAYLOAD_BYTES = 2**40  # 1 TiB: refuses a header that would make a receiver allocate absurdly
MAX_HEADER_BYTES = 16 * 2**20

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
    nbytes: int  # payload size in bytes: prod(shape) * itemsize
    checksum: int | None = None  # CRC-32 of the payload bytes, or None when not computed

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
        _check_int("nbytes", self.nbytes, low=1, high=MAX_PAYLOAD_BYTES)
        expected = math.prod(self.shape) * self.itemsize
        if self.nbytes != expected:
            raise KVTransferError(
                f"nbytes: {self.nbytes} != {expected} for shape {self.shape} of {self.dtype}"
            )
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

    def to_msgpack(self) -> bytes:
        fields = {name: getattr(self, name) for name in _FIELDS}
        fields["block_hashes"] = list(self.block_hashes)
        return msgpack.packb({"version": WIRE_VERSION, **fields}, use_bin_type=True)

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
        if version != WIRE_VERSION:
            raise KVTransferError(f"version: expected {WIRE_VERSION}, got {version!r}")
        missing = [name for name in _FIELDS if name not in fields]
        unknown = sorted(str(name) for name in fields if name not in _FIELDS)
        if missing or unknown:
            raise KVTransferError(f"header: missing fields {missing}, unknown fields {unknown}")
        if not isinstance(fields["block_hashes"], list):
            raise KVTransferError("block_hashes: expected a list of bytes")
        return cls(**fields)


def pack_kv(
    kv: torch.Tensor,
    block_hashes: Sequence[bytes],
    num_tokens: int,
    with_checksum: bool = False,
) -> tuple[KVBlockHeader, np.ndarray]:
    """Header and numpy view of a [L, 2, B, S, H, D] KV tensor on the CPU.

    Zero-copy when ``kv`` is contiguous (the array shares its memory: don't modify ``kv`` while
    the payload is published); bfloat16 comes back as its uint16 bits.
    """
    if not isinstance(kv, torch.Tensor):
        raise KVTransferError(f"kv: expected a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != 6 or kv.shape[1] != 2:
        raise KVTransferError(f"kv: expected shape [L, 2, B, S, H, D], got {tuple(kv.shape)}")
    if kv.dtype not in _DTYPE_NAMES:
        raise KVTransferError(f"kv: dtype {kv.dtype} not one of {sorted(_DTYPES)}")
    if kv.device.type != "cpu":
        raise KVTransferError(f"kv: pack_kv needs a CPU tensor, got device {kv.device}")
    kv = kv.detach().contiguous()
    bits = kv.view(torch.uint16) if kv.dtype == torch.bfloat16 else kv
    array = bits.numpy()
    num_layers, _, num_blocks, block_size, num_kv_heads, head_dim = kv.shape
    header = KVBlockHeader(
        num_layers=num_layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=_DTYPE_NAMES[kv.dtype],
        block_hashes=tuple(block_hashes),
        num_tokens=num_tokens,
        nbytes=array.nbytes,
        checksum=zlib.crc32(_byte_view(array)) if with_checksum else None,
    )
    return header, array


def unpack_kv(header: KVBlockHeader, payload: KVPayload) -> torch.Tensor:
    """The [L, 2, B, S, H, D] tensor of ``header.dtype`` that ``payload`` holds, after checks.

    ``payload`` is either typed (a numpy array or tensor of the header's dtype and shape; for
    bfloat16 also uint16 bits) or raw (bytes-like, or a 1-D uint8 array/tensor) of exactly
    ``header.nbytes`` bytes. Zero-copy: the result shares the payload's memory, and is read-only
    when the payload is (e.g. a Ray object store view): copy it before writing in place.
    """
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
    if header.checksum is not None:
        actual = zlib.crc32(_byte_view(raw.cpu().numpy()))
        if actual != header.checksum:
            raise KVTransferError(
                f"checksum: payload CRC-32 {actual:#010x} != header {header.checksum:#010x}"
            )
    return raw.view(header.torch_dtype).reshape(header.shape)  # [L, 2, B, S, H, D]


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


def _byte_view(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8))


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KVTransferError(f"{name}: expected an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise KVTransferError(f"{name}: {value} outside [{low}, {high}]")
