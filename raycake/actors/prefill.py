"""PrefillInstance: computes a prompt's KV (reusing local and store prefix blocks), hands it on.

A plain class with async methods; ``cluster/`` makes it a Ray actor. Its engine is a scheduler
whose requests stop after the first token and keep their KV until it has been exported.

Titans models: the memory state after the prompt travels with its KV (wire version 3), and the
KV store keeps memory-state snapshots like blocks: the block that ends at the prompt's last
memory-chunk boundary is stored with the state at that boundary. A prefix read from the store is
only a hit up to a boundary whose snapshot came with it (the engine cuts it back otherwise).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import replace
from typing import Any

import torch
from ray.exceptions import RayError

from raycake.actors.calibration import samples_from_steps
from raycake.actors.instance import EngineInstance
from raycake.actors.kv_store import replica_shard, shard_for_block
from raycake.actors.messages import PrefillResult, PrefillWork
from raycake.cluster.config import TelemetryConfig
from raycake.engine.config import EngineConfig
from raycake.engine.runner import kv_cache_bytes_per_block
from raycake.policies.step_cost_model import StepCostModel
from raycake.transfer import KVHandle
from raycake.transfer.wire import KVBlockHeader, KVTransferError, pack_kv, unpack_payload

logger = logging.getLogger(__name__)


class PrefillInstance(EngineInstance):
    def __init__(
        self,
        instance_id: str,
        engine_config: EngineConfig,
        transfer_backend: str = "object_store",
        store_shards: list[Any] | None = None,
        telemetry: TelemetryConfig | None = None,
    ) -> None:
        super().__init__(instance_id, engine_config, transfer_backend, telemetry)
        self.store_shards = list(store_shards or [])
        self._background: set[asyncio.Task] = set()
        self._block_bytes = kv_cache_bytes_per_block(
            self.engine.model_config, engine_config.cache.block_size, self.engine.runner.dtype
        )

    async def prefill(self, work: PrefillWork) -> PrefillResult:
        started = time.perf_counter()
        rid = work.request_id
        with self.telemetry.span("prefill", work.trace_context, instance=self.instance_id):
            hashes = self.engine.prefix_block_hashes(work.prompt_token_ids)  # pure: no state
            local = await self.loop.call(self.engine.num_cached_prefix_blocks, hashes)
            from_store, fetch_seconds = 0, 0.0
            if self.store_shards and work.fetch_from_store_blocks > 0:
                fetch_started = time.perf_counter()
                end = min(local + work.fetch_from_store_blocks, len(hashes))
                from_store = await self._fetch_from_store(hashes, local, end)
                fetch_seconds = time.perf_counter() - fetch_started
            queue = self.loop.subscribe(rid)
            try:
                await self.loop.call(
                    self.engine.add_request,
                    work.prompt_token_ids,
                    replace(work.sampling_params, max_tokens=1),
                    request_id=rid,
                    hold_kv=True,
                )
                while True:
                    delta = await queue.get()
                    if isinstance(delta, BaseException):
                        raise delta
                    if delta.finished:
                        break
                output, exported, snapshot = await self.loop.call(self._take_output_and_kv, rid)
            finally:
                # Done, failed or cancelled (the caller went away): nothing of the request may
                # stay in the engine, its held blocks included. Idempotent.
                await asyncio.shield(self.loop.call(self._forget, rid))
            if output.finish_reason == "error":
                return self._failed(work, output.error or "prefill failed", started)
            finish = _finish_reason(work, output.finish_reason)
            # The EAGLE target features travel with the KV, so the decode instance's head drafts
            # from the prompt's real features (None without speculation); so does a Titans
            # model's memory state after the prompt (None for other models).
            header, payload = await asyncio.to_thread(
                functools.partial(
                    pack_kv,
                    exported.kv,
                    exported.block_hashes,
                    exported.num_tokens,
                    features=exported.features,
                    memory_state=exported.memory_state,
                )
            )
            handle = None
            if not finish:
                handle = await self.in_transfer_thread(self.transfer.publish, header, payload)
            if self.store_shards and exported.block_hashes:
                # Off the request's critical path: the export is a copy, free to outlive it.
                task = asyncio.get_running_loop().create_task(
                    self._publish_to_store(exported.kv, exported.block_hashes, snapshot)
                )
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        return PrefillResult(
            request_id=rid,
            instance_id=self.instance_id,
            first_token_id=output.token_ids[0],
            finish_reason=finish,
            kv_handle=handle,
            block_hashes=hashes,
            num_cached_tokens=output.num_cached_tokens,
            num_store_blocks=from_store,
            store_fetch_bytes=from_store * self._block_bytes,
            store_fetch_seconds=fetch_seconds,
            kv_bytes=header.nbytes if handle is not None else 0,
            seconds=time.perf_counter() - started,
        )

    def _take_output_and_kv(self, request_id: str):
        """(output, exported KV or None, memory snapshot or None) of a finished request; engine
        thread. The snapshot (Titans, when there is a store to publish it to) is the state at
        the prompt's last chunk boundary, read while the request still holds its slot."""
        output = self.engine.pop_finished(request_id)
        if output.finish_reason == "error":
            return output, None, None
        snapshot = None
        if self.store_shards:
            snapshot = self.engine.export_memory_snapshot(request_id)
        return output, self.engine.export_kv(request_id), snapshot

    def _forget(self, request_id: str) -> None:
        """Abort the request if it still runs, drop its output and free its held blocks."""
        if self.engine.is_unfinished(request_id):
            self.engine.abort_request(request_id)
        self.engine.discard_finished(request_id)
        self.engine.release_kv(request_id)

    def _failed(self, work: PrefillWork, error: str, started: float) -> PrefillResult:
        """A request that failed on this instance (bad input the checks missed, a poisoned
        sample): its own fault, so it ends with the error instead of being retried."""
        return PrefillResult(
            request_id=work.request_id,
            instance_id=self.instance_id,
            first_token_id=-1,
            finish_reason="error",
            kv_handle=None,
            block_hashes=[],
            num_cached_tokens=0,
            num_store_blocks=0,
            store_fetch_bytes=0,
            store_fetch_seconds=0.0,
            kv_bytes=0,
            seconds=time.perf_counter() - started,
            error=error,
        )

    async def _fetch_from_store(self, prompt_hashes: list[bytes], start: int, end: int) -> int:
        """Read the leading run of ``prompt_hashes[start:end]`` (the prompt's blocks after the
        ``start`` cached here) from the shards into the local prefix cache, with the memory
        snapshot of the furthest block in the run that carries one (Titans)."""
        hashes = prompt_hashes[start:end]
        by_shard: dict[int, list[bytes]] = {}
        for h in hashes:
            by_shard.setdefault(shard_for_block(h, len(self.store_shards)), []).append(h)
        # One call per shard, all in flight at once; each reply carries its blocks' bytes.
        found = await self._read_shards(by_shard)
        missing = [h for h in hashes if h not in found]
        if missing and len(self.store_shards) > 1:
            # A dead or evicted primary: hot blocks may have a replica on the next shard.
            retry: dict[int, list[bytes]] = {}
            for h in missing:
                primary = shard_for_block(h, len(self.store_shards))
                retry.setdefault(replica_shard(primary, len(self.store_shards)), []).append(h)
            found.update(await self._read_shards(retry))
        run = []
        for h in hashes:
            if h not in found:
                break
            run.append(h)
        if not run:
            return 0
        kv, snapshots = await asyncio.to_thread(_unpack_blocks, run, [found[h] for h in run])
        snapshot = None
        if snapshots:
            last = max(snapshots)  # the furthest block with a state: the longest prefix
            snapshot = (prompt_hashes[: start + last + 1], snapshots[last])
        return await self.loop.call(self._import_from_store, run, kv, snapshot)

    def _import_from_store(
        self,
        run: list[bytes],
        kv: torch.Tensor,
        snapshot: tuple[list[bytes], dict[str, torch.Tensor]] | None,
    ) -> int:
        """Import the blocks, then the snapshot when every block up to its boundary is cached
        (without them it could never be used, and would only take a slot); engine thread."""
        imported = self.engine.import_prefix_blocks(run, kv)
        if snapshot is not None:
            prefix, tensors = snapshot
            if self.engine.num_cached_prefix_blocks(prefix) == len(prefix):
                try:
                    self.engine.import_memory_snapshot(prefix[-1], tensors)
                except ValueError as exc:
                    # Another model's state or a poisoned one: the prefix is recomputed.
                    logger.warning("%s: store snapshot refused: %s", self.instance_id, exc)
        return imported

    async def _read_shards(self, by_shard: dict[int, list[bytes]]) -> dict[bytes, tuple]:
        """Blocks by hash from each shard's leading run; a shard that fails contributes none."""
        replies = await asyncio.gather(
            *(self.store_shards[s].read_prefix.remote(hs) for s, hs in by_shard.items()),
            return_exceptions=True,
        )
        found: dict[bytes, tuple] = {}
        for reply in replies:
            if isinstance(reply, RayError):
                continue  # the store is a cache: a lost shard means recomputing, not failing
            if isinstance(reply, BaseException):
                raise reply
            found.update({h: (header, array) for h, header, array in reply})
        return found

    async def _publish_to_store(
        self,
        kv: torch.Tensor,
        block_hashes: list[bytes],
        snapshot: tuple[bytes, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Send the full blocks the store lacks to their shards (shards keep one copy each).
        ``snapshot`` (Titans: ``export_memory_snapshot``) goes with the block that ends at its
        boundary, also when the store holds that block without a state yet. The store is a
        cache: a shard that is down or restarting misses these blocks, and a later request
        recomputes them; nothing fails."""
        num_shards = len(self.store_shards)
        by_shard: dict[int, list[int]] = {}
        for i, h in enumerate(block_hashes):
            by_shard.setdefault(shard_for_block(h, num_shards), []).append(i)
        states: dict[int, dict[str, torch.Tensor]] = {}
        if snapshot is not None and snapshot[0] in block_hashes:
            states[block_hashes.index(snapshot[0])] = snapshot[1]
        shards = list(by_shard)
        queries = [
            self.store_shards[s].contains.remote([block_hashes[i] for i in by_shard[s]])
            for s in shards
        ]
        if states:
            state_shard = self.store_shards[shard_for_block(snapshot[0], num_shards)]
            queries.append(state_shard.contains.remote([snapshot[0]], with_state=True))
        answers = await asyncio.gather(*queries, return_exceptions=True)
        held = answers[: len(shards)]
        if states and (isinstance(answers[-1], BaseException) or answers[-1][0]):
            states.clear()  # the store has that block with its state, or the shard is down
        puts = []
        for shard, present in zip(shards, held, strict=True):
            if isinstance(present, BaseException):
                continue
            send = [
                i for i, p in zip(by_shard[shard], present, strict=True) if not p or i in states
            ]
            if send:
                blocks = await asyncio.to_thread(_pack_blocks, kv, block_hashes, send, states)
                puts.append(self.store_shards[shard].put.remote(blocks))
        await asyncio.gather(*puts, return_exceptions=True)

    async def release(self, handle: KVHandle) -> None:
        """The decode instance has the KV (or the request is over): free the published copy."""
        await self.in_transfer_thread(self.transfer.release, handle)

    async def is_idle(self) -> bool:
        """No request in the engine, no published KV a decode instance may still read, and no
        block on its way to the KV store (what it publishes there must outlive it)."""
        if self._background or self.transfer.num_published:
            return False
        return await super().is_idle()

    async def reset_prefix_cache(self) -> None:
        """Forget locally cached blocks, once the KV store holds every block published."""
        if self._background:
            await asyncio.gather(*self._background)
        await self.loop.call(self.engine.scheduler.reset_prefix_cache)

    def current_cost_model(self) -> StepCostModel:
        """Refit from recent real steps when they cover enough shapes; else the start-up fit."""
        prefill, decode = samples_from_steps(self.loop.steps)
        try:
            return StepCostModel.fit(prefill, decode) if prefill and decode else self.cost_model
        except ValueError:
            return self.cost_model


def _pack_blocks(
    kv: torch.Tensor,
    block_hashes: list[bytes],
    indices: list[int],
    states: dict[int, dict[str, torch.Tensor]] | None = None,
) -> list[tuple[bytes, bytes, Any]]:
    """(hash, msgpack header, payload) of each block ``indices`` of ``kv`` [L, 2, n, P, K, Dh];
    a block with an entry in ``states`` carries that memory state too (wire version 3)."""
    states = states or {}
    blocks = []
    for i in indices:
        header, payload = pack_kv(
            kv[:, :, i : i + 1], [block_hashes[i]], kv.shape[3], memory_state=states.get(i)
        )
        blocks.append((block_hashes[i], header.to_msgpack(), payload))
    return blocks


def _unpack_blocks(
    block_hashes: list[bytes], blocks: list[tuple[bytes, Any]]
) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]]:
    """Store blocks (msgpack header, payload) asked for by ``block_hashes``, checked against
    their headers: their KV as one tensor, and the memory snapshots some carry, by index."""
    tensors, snapshots = [], {}
    for i, (block_hash, (header_bytes, payload)) in enumerate(
        zip(block_hashes, blocks, strict=True)
    ):
        header = KVBlockHeader.from_msgpack(header_bytes)
        if header.block_hashes != (block_hash,):
            # A snapshot is registered under the hash it was asked for: it must be that block's.
            raise KVTransferError(f"block_hashes: store block {i} is not the block asked for")
        unpacked = unpack_payload(header, payload)
        tensors.append(unpacked.kv)
        if unpacked.memory_state is not None:
            snapshots[i] = unpacked.memory_state
    return torch.cat(tensors, dim=2), snapshots  # [layers, 2, n, P, K, Dh]


def _finish_reason(work: PrefillWork, prefill_reason: str | None) -> str | None:
    """The request's own finish reason after its first token, or None when decoding goes on.

    The prefill engine ran the real parameters with ``max_tokens=1``: its "stop" (EOS, a stop
    token id) is the request's; its "length" is only the request's when it asked for one token.
    """
    if prefill_reason == "stop":
        return "stop"
    return "length" if work.sampling_params.max_tokens == 1 else None
