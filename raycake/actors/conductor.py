"""Conductor: the global scheduler. Keeps which instance and which store shard hold which block
hashes, and each instance's queue and load; asks the scheduling policy for a (prefill, decode)
pair per request, or rejects it early. The decision itself lives in ``policies/scheduling.py``.

Its books are soft state. Given the instances' and the store shards' actor handles, a conductor
(re)started over a running cluster rebuilds them: the prefix indexes from what each prefill
instance and store shard holds, and the decode reservations from the instances' live loads
(requests it did not schedule itself are re-read until they drain). Instances that the driver
reports down are left out of its decisions until they answer again.

Autoscaling: the autoscaler adds instances (``add_instance``), drains them (``drain_instance``:
no new request goes there, those in flight finish) and removes them once ``num_in_flight`` is
0; ``planner_signals`` is what the planner policy decides on, read from these books.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from raycake.actors.messages import InstanceLoad
from raycake.policies.cluster_view import routable_instances
from raycake.policies.planner import DecodeInstanceStats, PrefillInstanceStats
from raycake.policies.scheduling import (
    ClusterView,
    DecodeInstanceView,
    PrefillInstanceView,
    Rejection,
    RequestView,
    ScheduleDecision,
    SchedulingConfig,
    scheduling_policy_from_config,
)
from raycake.policies.step_cost_model import StepCostModel
from raycake.transfer.block_store import BlockStore

# Weight of each new store-read measurement in the conductor's bandwidth estimate.
BANDWIDTH_EWMA = 0.3
# How often a rebuilt conductor re-reads the decode instances' loads while requests it did not
# schedule (in flight when it restarted) still hold blocks there.
ORPHAN_REFRESH_S = 1.0
# How often the conductor re-reads every instance's cost model (a decode instance refits its
# decode half to its recent steps: see ``DecodeInstance.current_cost_model``).
COST_MODEL_REFRESH_S = 2.0
# Weight of each scheduled prompt in the typical prompt length the planner signals assume.
PROMPT_LENGTH_EWMA = 0.1


@dataclass
class _InFlight:
    prefill_id: str
    decode_id: str
    predicted_prefill_s: float
    num_blocks: int  # KV blocks reserved on the decode instance
    num_tokens: int  # prompt + max_tokens
    num_prompt_tokens: int


@dataclass
class _DecodeState:
    load: InstanceLoad
    cost_model: StepCostModel
    capacity_blocks: int
    num_assigned: int = 0
    reserved_blocks: int = 0
    context_tokens: int = 0
    # Held by requests this conductor did not schedule (in flight across its restart), as last
    # read from the instance; 0 once they drained.
    orphan_blocks: int = 0
    orphan_running: int = 0


@dataclass(frozen=True)
class PlannerSignals:
    """The load of the routable (not draining) instances since the last call: what the planner
    policy decides on (``policies.planner.PlannerView`` without the counts, which the
    autoscaler adds: it also counts the instances still starting)."""

    prefill: tuple[PrefillInstanceStats, ...]
    decode: tuple[DecodeInstanceStats, ...]
    num_rejected: int  # rejected by the policy for load (not bad requests)
    num_admitted: int
    ttft_slo_s: float | None
    tbt_slo_s: float | None


@dataclass(frozen=True)
class ConductorStats:
    scheduled: int
    rejected: int
    queued_prefill_seconds: dict[str, float]
    transfer_bandwidth_bytes_per_s: float


class Conductor:
    def __init__(
        self,
        config: SchedulingConfig,
        prefill_loads: list[InstanceLoad],
        decode_loads: list[InstanceLoad],
        block_size: int,
        block_bytes: int,
        store_capacity_blocks: int,
        transfer_bandwidth_bytes_per_s: float,
        max_model_len: int | None = None,
        instances: dict[str, Any] | None = None,
        store_shards: list[Any] | None = None,
    ) -> None:
        """``instances`` (actor handles by instance id) and ``store_shards``: where to rebuild
        the books from after a restart; without them (unit tests) the books start empty."""
        self.config = config
        self.max_model_len = max_model_len
        self._instances = dict(instances or {})
        self._store_shards = list(store_shards or [])
        self._unavailable: set[str] = set()
        self._rebuild_task: asyncio.Task | None = None
        self._rebuild_pending = bool(self._instances or self._store_shards)
        self._refresh_task: asyncio.Task | None = None
        self.policy = scheduling_policy_from_config(config)
        self.block_size = block_size
        self.block_bytes = block_bytes
        self.bandwidth = transfer_bandwidth_bytes_per_s
        # Approximate per-instance prefix caches: an LRU of hashes as big as the instance's pool.
        self._prefill_models = {
            load.instance_id: StepCostModel.from_dict(load.cost_model or {})
            for load in prefill_loads
        }
        self._prefill_index: dict[str, BlockStore[None]] = {
            load.instance_id: BlockStore(max(1, load.free_kv_blocks)) for load in prefill_loads
        }
        self._queued_s = {load.instance_id: 0.0 for load in prefill_loads}
        self._num_queued = {load.instance_id: 0 for load in prefill_loads}
        self._queued_tokens = {load.instance_id: 0 for load in prefill_loads}
        self._draining: set[str] = set()
        self._typical_prompt_tokens = float(block_size)
        self._window_rejected = self._window_admitted = 0
        self._store_index: BlockStore[None] | None = (
            BlockStore(store_capacity_blocks) if store_capacity_blocks > 0 else None
        )
        self._decode = {
            load.instance_id: _DecodeState(
                load, StepCostModel.from_dict(load.cost_model or {}), load.free_kv_blocks
            )
            for load in decode_loads
        }
        self._in_flight: dict[str, _InFlight] = {}
        self._scheduled = self._rejected = 0

    def ready(self) -> bool:
        self._start_rebuild()
        self._start_cost_model_refresh()
        return True

    # ---- rebuilding soft state -----------------------------------------------------------------

    def _start_rebuild(self) -> None:
        """Rebuild the books in the background, once, when running in an event loop (the
        actor's): the first decisions after a restart may miss cached prefixes, never fail."""
        if not self._rebuild_pending:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: a plain unit test
            self._rebuild_task = asyncio.get_running_loop().create_task(self._rebuild())
            self._rebuild_pending = False

    def _start_cost_model_refresh(self) -> None:
        """Keep re-reading the instances' cost models in the background, from the first call
        made in the actor's event loop on (none in a plain unit test, or without handles)."""
        if self._refresh_task is not None or not self._instances:
            return
        with contextlib.suppress(RuntimeError):  # no running loop
            loop = asyncio.get_running_loop()
            self._refresh_task = loop.create_task(self._refresh_cost_models_forever())

    async def _refresh_cost_models_forever(self) -> None:
        while True:
            await asyncio.sleep(COST_MODEL_REFRESH_S)
            ids = [
                iid for iid in self._instances if iid in self._decode or iid in self._prefill_index
            ]
            loads = await asyncio.gather(
                *(self._instances[iid].load.remote() for iid in ids), return_exceptions=True
            )
            for load in loads:
                if not isinstance(load, BaseException):  # down or restarting: next round
                    self.update_cost_model(load)

    async def _rebuild(self) -> None:
        prefill_ids = [iid for iid in self._instances if iid in self._prefill_index]
        replies = await asyncio.gather(
            *(self._instances[iid].cached_block_hashes.remote() for iid in prefill_ids),
            return_exceptions=True,
        )
        for iid, hashes in zip(prefill_ids, replies, strict=True):
            if not isinstance(hashes, BaseException):
                for h in hashes:
                    self._prefill_index[iid].put(h, None, 1)
        if self._store_index is not None:
            replies = await asyncio.gather(
                *(shard.block_hashes.remote() for shard in self._store_shards),
                return_exceptions=True,
            )
            for hashes in replies:
                if not isinstance(hashes, BaseException):
                    for h in hashes:
                        self._store_index.put(h, None, 1)
        while await self._refresh_orphans():
            await asyncio.sleep(ORPHAN_REFRESH_S)

    async def _refresh_orphans(self) -> bool:
        """Re-read decode loads; whatever the instance holds beyond this conductor's own
        reservations is an orphan's. Returns whether any orphan is left."""
        decode_ids = [iid for iid in self._instances if iid in self._decode]
        loads = await asyncio.gather(
            *(self._instances[iid].load.remote() for iid in decode_ids), return_exceptions=True
        )
        left = False
        for iid, load in zip(decode_ids, loads, strict=True):
            if isinstance(load, BaseException):
                continue
            state = self._decode[iid]
            used = state.capacity_blocks - load.free_kv_blocks
            state.orphan_blocks = max(0, used - state.reserved_blocks)
            state.orphan_running = max(0, load.num_running - state.num_assigned)
            left = left or state.orphan_running > 0
        return left

    # ---- instance health, as the driver sees it ------------------------------------------------

    def instance_down(self, instance_id: str) -> None:
        """A call to this instance failed: it is dead or restarting. Route around it."""
        self._unavailable.add(instance_id)

    def instance_up(self, instance_id: str) -> None:
        """The instance answers again. A restarted one lost its prefix cache."""
        if instance_id in self._unavailable:
            self._unavailable.discard(instance_id)
            if instance_id in self._prefill_index:
                self._prefill_index[instance_id].clear()

    def schedule(
        self,
        request_id: str,
        block_hashes: list[bytes],
        num_prompt_tokens: int,
        max_tokens: int,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
    ) -> ScheduleDecision | Rejection:
        self._start_rebuild()
        self._start_cost_model_refresh()
        if request_id in self._in_flight:
            raise ValueError(f"request_id: {request_id!r} is already scheduled")
        if self.max_model_len is not None and num_prompt_tokens + max_tokens > self.max_model_len:
            self._rejected += 1
            return Rejection(
                f"max_model_len: prompt of {num_prompt_tokens} tokens + max_tokens {max_tokens} "
                f"exceeds the model's context of {self.max_model_len} tokens",
                predicted_ttft_s=0.0,
                predicted_tbt_s=None,
            )
        prefill_ids = self._routable(self._prefill_index)
        decode_ids = self._routable(self._decode)
        store_prefix = self._store_index.prefix_length(block_hashes) if self._store_index else 0
        request = RequestView(
            request_id=request_id,
            num_prompt_tokens=num_prompt_tokens,
            block_size=self.block_size,
            max_tokens=max_tokens,
            store_prefix_blocks=store_prefix,
            store_block_bytes=self.block_bytes,
            ttft_slo_s=ttft_slo_s if ttft_slo_s is not None else self.config.ttft_slo_s,
            tbt_slo_s=tbt_slo_s if tbt_slo_s is not None else self.config.tbt_slo_s,
            # Routers with their own prefix trees key them by hash: the whole digest as an int.
            prefix_hashes=tuple(int.from_bytes(h, "little") for h in block_hashes),
        )
        cluster = ClusterView(
            prefill=[
                PrefillInstanceView(
                    instance_id=iid,
                    queued_prefill_seconds=self._queued_s[iid],
                    num_queued=self._num_queued[iid],
                    cost_model=self._prefill_models[iid],
                    cached_prefix_blocks=index.prefix_length(block_hashes),
                )
                for iid, index in self._prefill_index.items()
                if iid in prefill_ids
            ],
            decode=[
                DecodeInstanceView(
                    instance_id=iid,
                    num_running=state.num_assigned + state.orphan_running,
                    max_num_seqs=state.load.max_num_seqs,
                    total_context_tokens=state.context_tokens,
                    free_kv_blocks=max(
                        0, state.capacity_blocks - state.reserved_blocks - state.orphan_blocks
                    ),
                    cost_model=state.cost_model,
                )
                for iid, state in self._decode.items()
                if iid in decode_ids
            ],
            transfer_bandwidth_bytes_per_s=self.bandwidth,
        )
        decision = self.policy.schedule(request, cluster)
        if isinstance(decision, Rejection):
            self._rejected += 1
            self._window_rejected += 1
            return decision
        self._scheduled += 1
        self._window_admitted += 1
        self._typical_prompt_tokens += PROMPT_LENGTH_EWMA * (
            num_prompt_tokens - self._typical_prompt_tokens
        )
        flight = _InFlight(
            prefill_id=decision.prefill_instance_id,
            decode_id=decision.decode_instance_id,
            predicted_prefill_s=decision.predicted_prefill_s,
            num_blocks=request.num_kv_blocks_needed,
            num_tokens=num_prompt_tokens + max_tokens,
            num_prompt_tokens=num_prompt_tokens,
        )
        self._in_flight[request_id] = flight
        self._queued_s[flight.prefill_id] += flight.predicted_prefill_s
        self._num_queued[flight.prefill_id] += 1
        self._queued_tokens[flight.prefill_id] += num_prompt_tokens
        decode = self._decode[flight.decode_id]
        decode.num_assigned += 1
        decode.reserved_blocks += flight.num_blocks
        decode.context_tokens += flight.num_tokens
        return decision

    def prefill_done(
        self,
        request_id: str,
        block_hashes: list[bytes],
        store_fetch_bytes: int = 0,
        store_fetch_seconds: float = 0.0,
    ) -> None:
        """The prefill instance now caches these blocks, and the store received them."""
        if store_fetch_bytes and store_fetch_seconds > 0:
            # Plan with the bandwidth store reads really get (per-call costs included).
            measured = store_fetch_bytes / store_fetch_seconds
            self.bandwidth = (1 - BANDWIDTH_EWMA) * self.bandwidth + BANDWIDTH_EWMA * measured
        flight = self._in_flight.get(request_id)
        if flight is None:
            return
        self._queued_s[flight.prefill_id] = max(
            0.0, self._queued_s[flight.prefill_id] - flight.predicted_prefill_s
        )
        self._num_queued[flight.prefill_id] -= 1
        self._queued_tokens[flight.prefill_id] -= flight.num_prompt_tokens
        flight.predicted_prefill_s = 0.0
        index = self._prefill_index[flight.prefill_id]
        for h in block_hashes:
            index.put(h, None, 1)
            if self._store_index is not None:
                self._store_index.put(h, None, 1)

    def request_done(self, request_id: str) -> None:
        """Finished, failed or aborted: release what the request held in the conductor's books."""
        flight = self._in_flight.pop(request_id, None)
        if flight is None:
            return
        if flight.predicted_prefill_s:
            self._queued_s[flight.prefill_id] = max(
                0.0, self._queued_s[flight.prefill_id] - flight.predicted_prefill_s
            )
            self._num_queued[flight.prefill_id] -= 1
            self._queued_tokens[flight.prefill_id] -= flight.num_prompt_tokens
        decode = self._decode[flight.decode_id]
        decode.num_assigned -= 1
        decode.reserved_blocks -= flight.num_blocks
        decode.context_tokens -= flight.num_tokens

    def forget_instance_caches(self) -> None:
        """The prefill instances dropped their local prefix caches."""
        for index in self._prefill_index.values():
            index.clear()

    def update_cost_model(self, load: InstanceLoad) -> None:
        """An instance reports a recalibrated cost model."""
        if load.cost_model is None:
            return
        model = StepCostModel.from_dict(load.cost_model)
        if load.instance_id in self._prefill_models:
            self._prefill_models[load.instance_id] = model
        elif load.instance_id in self._decode:
            self._decode[load.instance_id].cost_model = model

    def stats(self) -> ConductorStats:
        return ConductorStats(self._scheduled, self._rejected, dict(self._queued_s), self.bandwidth)

    # ---- autoscaling ---------------------------------------------------------------------------

    def _routable(self, instance_ids: Any) -> list[str]:
        """Not draining, and not reported down (unless all are: see ``routable_instances``)."""
        serving = [iid for iid in instance_ids if iid not in self._draining]
        return routable_instances(serving, self._unavailable)

    def instances(self) -> dict[str, Any]:
        """Actor handles of every instance, by id (draining ones included)."""
        return dict(self._instances)

    def draining_instances(self) -> list[str]:
        return sorted(self._draining)

    def add_instance(self, load: InstanceLoad, handle: Any = None) -> None:
        """A new instance (``prefill-N`` or ``decode-N``) takes requests from now on; adding a
        known one (the autoscaler re-syncing a restarted conductor) only renews its handle."""
        iid = load.instance_id
        if handle is not None:
            self._instances[iid] = handle
        if iid in self._prefill_index or iid in self._decode:
            return
        model = StepCostModel.from_dict(load.cost_model or {})
        if iid.startswith("prefill-"):
            self._prefill_models[iid] = model
            self._prefill_index[iid] = BlockStore(max(1, load.free_kv_blocks))
            self._queued_s[iid], self._num_queued[iid], self._queued_tokens[iid] = 0.0, 0, 0
        elif iid.startswith("decode-"):
            self._decode[iid] = _DecodeState(load, model, load.free_kv_blocks)
        else:
            raise ValueError(f"instance_id: expected prefill-N or decode-N, got {iid!r}")

    def drain_instance(self, instance_id: str) -> None:
        """Send no new request to the instance; those in flight there finish."""
        self._known(instance_id)
        role = self._prefill_index if instance_id in self._prefill_index else self._decode
        if not [iid for iid in role if iid not in self._draining and iid != instance_id]:
            raise ValueError(f"instance_id: {instance_id!r} is the last of its role: not drained")
        self._draining.add(instance_id)

    def num_in_flight(self, instance_id: str) -> int:
        """Requests that still need the instance: scheduled there (a prefill instance holds the
        published KV until the decode finished), or held across a conductor restart."""
        self._known(instance_id)
        count = sum(
            instance_id in (flight.prefill_id, flight.decode_id)
            for flight in self._in_flight.values()
        )
        state = self._decode.get(instance_id)
        return count + (state.orphan_running if state else 0)

    def remove_instance(self, instance_id: str, force: bool = False) -> None:
        """Forget a drained instance (its KV-store contributions stay in the store). ``force``:
        also when requests are still booked there (a drain that timed out: their callers are
        gone, or they end with an error and are retried elsewhere); their books are released."""
        if self.num_in_flight(instance_id) and not force:
            raise ValueError(f"instance_id: {instance_id!r} still has requests in flight")
        for request_id, flight in list(self._in_flight.items()):
            if instance_id in (flight.prefill_id, flight.decode_id):
                self.request_done(request_id)
        for books in (
            self._instances,
            self._prefill_index,
            self._prefill_models,
            self._queued_s,
            self._num_queued,
            self._queued_tokens,
            self._decode,
        ):
            books.pop(instance_id, None)
        self._draining.discard(instance_id)
        self._unavailable.discard(instance_id)

    def _known(self, instance_id: str) -> None:
        if instance_id not in self._prefill_index and instance_id not in self._decode:
            raise ValueError(f"instance_id: no instance {instance_id!r}")

    def planner_signals(self) -> PlannerSignals:
        """The routable instances' load now, and the admissions since the last call."""
        typical = max(1, round(self._typical_prompt_tokens))
        prefill = tuple(
            PrefillInstanceStats(
                instance_id=iid,
                predicted_ttft_s=self._queued_s[iid]
                + self._prefill_models[iid].prefill_seconds(typical, 0),
                queued_prefill_tokens=max(0, self._queued_tokens[iid]),
                num_queued_requests=max(0, self._num_queued[iid]),
                queued_s=self._queued_s[iid],
            )
            for iid in self._routable(self._prefill_index)
        )
        decode = []
        for iid in self._routable(self._decode):
            state = self._decode[iid]
            running = state.num_assigned + state.orphan_running
            used = state.reserved_blocks + state.orphan_blocks
            decode.append(
                DecodeInstanceStats(
                    instance_id=iid,
                    # The conductor's own prediction for the batch it placed there.
                    tbt_s=state.cost_model.decode_step_seconds(running, state.context_tokens)
                    if running
                    else None,
                    kv_utilization=min(1.0, used / max(1, state.capacity_blocks)),
                    num_running=running,
                    slot_utilization=min(1.0, running / max(1, state.load.max_num_seqs)),
                )
            )
        signals = PlannerSignals(
            prefill,
            tuple(decode),
            self._window_rejected,
            self._window_admitted,
            self.config.ttft_slo_s,
            self.config.tbt_slo_s,
        )
        self._window_rejected = self._window_admitted = 0
        return signals
