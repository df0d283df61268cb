"""Moving KV blocks between processes and nodes behind one protocol."""

from raycake.transfer.base import BACKENDS, KVHandle, KVLostError, KVTransfer, make_kv_transfer
from raycake.transfer.wire import KVBlockHeader, KVTransferError, pack_kv, unpack_kv

__all__ = [
    "BACKENDS",
    "KVBlockHeader",
    "KVHandle",
    "KVLostError",
    "KVTransfer",
    "KVTransferError",
    "make_kv_transfer",
    "pack_kv",
    "unpack_kv",
]
