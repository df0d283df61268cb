"""KV transfer with Mooncake's transfer engine: one-sided reads over TCP here, RDMA on clusters.

The sender registers the payload's memory with its TransferEngine; the handle names the engine
(session id "host:rpc_port") and the buffer (address, length). The receiver registers a fresh
buffer and pulls the bytes with ``transfer_sync_read``: no actor call, no object store. The engine
checks every read against the sender's registered buffers, so a stale or forged locator fails
("remote-supplied address ... is not within any registered buffer") instead of reading other memory.

Needs ``mooncake-transfer-engine-non-cuda`` (CPU hosts) or ``mooncake-transfer-engine`` (CUDA), and
the Debian packages ``libibverbs1`` and ``librdmacm1`` even for TCP. Engines use ``P2PHANDSHAKE``
metadata by default: no etcd or metadata server, each engine picks its own RPC port.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raycake.transfer.base import KVHandle, check_handle, check_sent_header
from raycake.transfer.wire import (
    KVBlockHeader,
    KVTransferError,
    UnpackedKV,
    check_payload,
    payload_bytes,
    unpack_payload,
)

PACKAGE_HINT = (
    "the mooncake backend needs the package mooncake-transfer-engine-non-cuda (CPU hosts) or "
    "mooncake-transfer-engine (CUDA hosts), plus the system libraries libibverbs1 and librdmacm1"
)


@dataclass(frozen=True)
class MooncakeLocator:
    session_id: str  # "host:rpc_port" of the sender's TransferEngine
    address: int  # start of the published payload in the sender's memory
    length: int  # payload bytes; equals the header's nbytes
    header_address: int  # the sender's copy of the header bytes, read with the payload
    header_length: int


def import_transfer_engine() -> type:
    """mooncake.engine.TransferEngine, or a KVTransferError that names the missing package."""
    # The engine logs every connection at INFO; MC_LOG_LEVEL is read when the library loads.
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:  # also raised when libibverbs.so.1 is missing
        raise KVTransferError(f"{PACKAGE_HINT} ({exc})") from exc
    return TransferEngine


class MooncakeTransfer:
    """One TransferEngine per instance (make one per actor), started on first use.

    ``hostname``: the address peers reach this engine at (default: the Ray node IP, else
    127.0.0.1). ``protocol``: "tcp" or "rdma" (then ``device_name`` picks the NICs, "" = all).
    """

    name = "mooncake"

    def __init__(
        self,
        hostname: str | None = None,
        protocol: str = "tcp",
        device_name: str = "",
        metadata_server: str = "P2PHANDSHAKE",
    ) -> None:
        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"transfer.protocol: expected 'tcp' or 'rdma', got {protocol!r}")
        self.hostname = hostname
        self.protocol = protocol
        self.device_name = device_name
        self.metadata_server = metadata_server
        self._engine: Any = None
        self._session_id = ""
        # transfer_id -> (payload kept alive, header bytes as an array, their addresses)
        self._published: dict[str, tuple[object, np.ndarray, list[int]]] = {}
        self._registrations: dict[int, int] = {}  # address -> publishes using it

    @property
    def session_id(self) -> str:
        self._ensure_engine()
        return self._session_id

    def publish(self, header: KVBlockHeader, payload: np.ndarray | torch.Tensor) -> KVHandle:
        check_payload(header, payload)
        engine = self._ensure_engine()
        flat = payload_bytes(payload)  # [nbytes] uint8, shares the payload's memory
        header_bytes = header.to_msgpack()
        header_array = np.frombuffer(bytearray(header_bytes), dtype=np.uint8)
        regions = [(flat.ctypes.data, flat.nbytes), (header_array.ctypes.data, len(header_bytes))]
        registered: list[int] = []
        try:
            for address, length in regions:
                self._register(engine, address, length)
                registered.append(address)
        except KVTransferError:
            self._unregister(registered)
            raise
        transfer_id = uuid.uuid4().hex
        self._published[transfer_id] = (payload, header_array, [a for a, _ in regions])
        locator = MooncakeLocator(self._session_id, flat.ctypes.data, flat.nbytes, *regions[1])
        return KVHandle(self.name, transfer_id, header_bytes, locator=locator)

    def fetch(self, handle: KVHandle) -> UnpackedKV:
        header = check_handle(handle, self.name)
        locator = handle.locator
        if not isinstance(locator, MooncakeLocator):
            raise KVTransferError(
                f"locator: expected a MooncakeLocator, got {type(locator).__name__}"
            )
        if locator.length != header.nbytes:
            raise KVTransferError(
                f"locator: length {locator.length} != header nbytes {header.nbytes}"
            )
        if locator.header_length != len(handle.header):
            raise KVTransferError(
                f"locator: header_length {locator.header_length} != {len(handle.header)}"
            )
        engine = self._ensure_engine()
        # [nbytes payload | header]: the payload first keeps it aligned; the receiver owns it.
        buffer = np.empty(header.nbytes + locator.header_length, dtype=np.uint8)
        address = buffer.ctypes.data
        if engine.register_memory(address, buffer.nbytes) != 0:
            raise KVTransferError(f"mooncake: register_memory of {buffer.nbytes} bytes failed")
        # NOTE: two single reads, not batch_transfer_sync_read: in 0.3.13 a batch with a slice
        # the peer rejects corrupts the heap ("malloc(): mismatching next->prev_size").
        # The header goes first, so a wrong handle fails before any payload moves.
        try:
            header_at = address + header.nbytes
            _read(engine, locator.session_id, header_at, locator.header_address, len(handle.header))
            check_sent_header(handle, buffer[header.nbytes :].tobytes())
            _read(engine, locator.session_id, address, locator.address, locator.length)
        finally:
            engine.unregister_memory(address)
        return unpack_payload(header, buffer[: header.nbytes])

    def release(self, handle: KVHandle) -> None:
        entry = self._published.pop(handle.transfer_id, None)
        if entry is not None:
            self._unregister(entry[2])

    def close(self) -> None:
        """Release everything still published."""
        for transfer_id in list(self._published):
            self.release(KVHandle(self.name, transfer_id, b"", None))

    @property
    def num_published(self) -> int:
        return len(self._published)

    def _register(self, engine: Any, address: int, length: int) -> None:
        if address not in self._registrations:
            rc = engine.register_memory(address, length)
            if rc != 0:
                raise KVTransferError(f"mooncake: register_memory of {length} bytes -> rc {rc}")
        self._registrations[address] = self._registrations.get(address, 0) + 1

    def _unregister(self, addresses: list[int]) -> None:
        for address in addresses:
            self._registrations[address] -= 1
            if self._registrations[address] == 0:
                del self._registrations[address]
                self._engine.unregister_memory(address)

    def _ensure_engine(self) -> Any:
        if self._engine is not None:
            return self._engine
        transfer_engine_cls = import_transfer_engine()
        hostname = self.hostname or _default_hostname()
        engine = transfer_engine_cls()
        rc = engine.initialize(hostname, self.metadata_server, self.protocol, self.device_name)
        if rc != 0:
            raise KVTransferError(
                f"mooncake: TransferEngine.initialize({hostname!r}, {self.metadata_server!r}, "
                f"{self.protocol!r}) -> rc {rc}"
            )
        self._engine = engine
        self._session_id = f"{hostname}:{engine.get_rpc_port()}"
        return engine


def _read(engine: Any, session_id: str, local: int, remote: int, length: int) -> None:
    rc = engine.transfer_sync_read(session_id, local, remote, length)
    if rc < 0:
        raise KVTransferError(
            f"mooncake: read of {length} bytes from {session_id} failed (rc {rc}): "
            "released, sender gone, or a bad locator"
        )


def _default_hostname() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
