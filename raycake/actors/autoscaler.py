"""Autoscaler: adds and drains prefill and decode instances to the counts the planner policy asks
for. The decision is ``policies/planner.py``'s; this actor only applies it.

Every ``planner_interval_s`` it reads the conductor's ``planner_signals``, counts the instances
running and starting, asks the planner, and then:
- scale-up: creates a named instance actor that asks for its role's resources (``prefill_resources``
  / ``decode_resources``), so that Ray's autoscaler (KubeRay's, on Kubernetes) adds a node of the
  worker group that offers them; once the instance has loaded and calibrated it joins the
  conductor. The instance is detached: it must not die with this actor.
- scale-down: drains one instance (the newest of the role): the conductor sends it nothing new,
  the requests in flight there finish (a prefill instance keeps serving its published KV until
  each decode has it), its blocks in the KV store stay; then it leaves the conductor and is
  killed, and Ray's autoscaler removes the idle node.
No request is cut: an instance is only killed once no request needs it.

An async actor: every method runs on its event loop and none blocks it (creating an actor and
``ray.kill`` only submit). Restarted by Ray, it takes the instances over from the conductor by
itself; it also re-adds its instances to a restarted conductor, which only knows those it was
created with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayError

from raycake.cluster.config import ClusterConfig
from raycake.cluster.instance_actors import find_instances, start_instance
from raycake.policies.planner import PlannerDecision, PlannerView, make_planner
from raycake.validation import check_int, check_number

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
# How often a draining instance is asked whether requests still need it.
DRAIN_POLL_S = 0.25


@dataclass(frozen=True)
class ScalingEvent:
    """One change of the instance counts, for the timeline (dashboard, tests, ``raycake``)."""

    time_s: float  # seconds since the autoscaler started
    num_prefill: int  # running + starting, after the change
    num_decode: int
    reason: str


@dataclass(frozen=True)
class ScalingStatus:
    """Instance ids by state and role, and the timeline so far."""

    running: dict[str, list[str]]
    starting: dict[str, list[str]]
    draining: dict[str, list[str]]
    timeline: list[ScalingEvent]
    last_reason: str | None


def _role(instance_id: str) -> str:
    return instance_id.split("-")[0]


def _index(instance_id: str) -> int:
    return int(instance_id.rsplit("-", 1)[1])


class Autoscaler:
    def __init__(self, config: ClusterConfig, conductor: Any, store_shards: list[Any]) -> None:
        self.config = config
        self.conductor = conductor
        self.store_shards = list(store_shards)
        self.planner = make_planner(config.planner)
        self._running: dict[str, Any] = {}  # instance id -> actor handle, taking requests
        self._starting: dict[str, Any] = {}
        self._draining: dict[str, Any] = {}
        self._tasks: set[asyncio.Task] = set()
        self._next_index = dict.fromkeys(ROLES, 0)
        self._started_at = time.monotonic()
        self._timeline: list[ScalingEvent] = []
        self._last_reason: str | None = None
        self._loop: asyncio.Task | None = None
        from ray.util.metrics import Gauge

        # The dashboard's view of scaling: instances by role and state, per deployment.
        self._gauge = Gauge(
            "raycake_instances",
            "Instances by role and state",
            tag_keys=("namespace", "role", "state"),
        )
        # NOTE: an async actor's __init__ runs in its event loop.
        self._taking_over = asyncio.get_running_loop().create_task(self._take_over())

    # ---- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Wait until the autoscaler has taken over the instances (the launch waits for it)."""
        await self._taking_over

    async def _take_over(self) -> None:
        """Take over the instances the conductor knows and those alive by name (draining ones
        resumed), then run the planner every ``planner_interval_s``.
        Runs from ``__init__``, so a restarted autoscaler resumes by itself."""
        instances: dict[str, Any] = await self.conductor.instances.remote()
        draining = set(await self.conductor.draining_instances.remote())
        # Instances alive by name that the conductor does not know (it restarted too): adopted,
        # and re-added to it at the next round.
        alive = await asyncio.to_thread(find_instances, self.config)
        instances = {**alive, **instances}
        for iid, handle in instances.items():
            role = _role(iid)
            self._next_index[role] = max(self._next_index[role], _index(iid) + 1)
            if iid in draining:
                self._draining[iid] = handle
                self._spawn(self._drain(iid, handle))
            else:
                self._running[iid] = handle
        self._record("start-up")
        # Also for "fixed", which never changes the counts: each round re-syncs a restarted
        # conductor with the instances added since the deployment started.
        self._loop = asyncio.get_running_loop().create_task(self._plan_forever())

    async def _plan_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.planner_interval_s)
            try:
                await self.tick()
            except Exception:  # a conductor restarting, a bad view: the next round tries again
                logger.exception("autoscaler: planning round failed")

    async def stop(self) -> list[Any]:
        """Stop planning and starting; returns the handles of every instance this actor knows
        (the driver that owns the deployment kills them)."""
        if self._loop is not None:
            self._loop.cancel()
        for task in list(self._tasks):
            task.cancel()
        return [*self._running.values(), *self._starting.values(), *self._draining.values()]

    # ---- planning ------------------------------------------------------------------------------

    async def tick(self) -> PlannerDecision:
        """One planning round: signals -> planner -> add or drain instances."""
        await self._sync_conductor()
        signals = await self.conductor.planner_signals.remote()
        view = PlannerView(
            now_s=time.monotonic(),
            num_prefill=self._count("prefill"),
            num_decode=self._count("decode"),
            prefill=signals.prefill,
            decode=signals.decode,
            num_rejected=signals.num_rejected,
            num_admitted=signals.num_admitted,
            ttft_slo_s=signals.ttft_slo_s,
            tbt_slo_s=signals.tbt_slo_s,
        )
        decision = self.planner.plan(view)
        self._last_reason = decision.reason
        await self._apply({"prefill": decision.num_prefill, "decode": decision.num_decode})
        self._record(decision.reason)
        return decision

    async def scale_to(self, num_prefill: int, num_decode: int) -> ScalingStatus:
        """Set the counts now, whatever the planner says (an operator's override; the planner
        may change them again at its next round)."""
        await self._taking_over
        targets = {"prefill": num_prefill, "decode": num_decode}
        for role, count in targets.items():
            check_int(f"num_{role}", count, low=1)
        if self.config.transfer_backend == "ray_direct" and any(
            count > self._count(role) for role, count in targets.items()
        ):
            raise ValueError(
                "transfer_backend: ray_direct joins every instance into one collective group at "
                "start-up, so no instance can be added; use object_store or mooncake"
            )
        await self._apply(targets)
        self._record(f"scale_to({num_prefill}, {num_decode})")
        return self._status()

    async def settle(self, timeout_s: float) -> ScalingStatus:
        """Wait until no instance is starting or draining (tests, ``raycake`` commands)."""
        check_number("timeout_s", timeout_s, low=0, low_exclusive=True)
        await self._taking_over
        deadline = time.monotonic() + timeout_s
        while self._starting or self._draining:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"instances still starting {sorted(self._starting)} or draining "
                    f"{sorted(self._draining)} after {timeout_s:g}s"
                )
            await asyncio.sleep(DRAIN_POLL_S)
        return self._status()

    async def status(self) -> ScalingStatus:
        await self._taking_over  # after a restart: once the instances are taken over
        return self._status()

    def _status(self) -> ScalingStatus:
        def by_role(instances: dict[str, Any]) -> dict[str, list[str]]:
            return {
                role: sorted((iid for iid in instances if _role(iid) == role), key=_index)
                for role in ROLES
            }

        return ScalingStatus(
            by_role(self._running),
            by_role(self._starting),
            by_role(self._draining),
            list(self._timeline),
            self._last_reason,
        )

    def _count(self, role: str) -> int:
        """Instances of ``role`` the planner counts: running and starting (not draining)."""
        return sum(_role(iid) == role for iid in (*self._running, *self._starting))

    def _record(self, reason: str) -> None:
        """Publish the counts; add a timeline event when they changed."""
        self._publish_counts()
        counts = (self._count("prefill"), self._count("decode"))
        last = self._timeline[-1] if self._timeline else None
        if last is not None and (last.num_prefill, last.num_decode) == counts:
            return  # the timeline keeps changes only
        self._timeline.append(
            ScalingEvent(time.monotonic() - self._started_at, counts[0], counts[1], reason)
        )

    def _publish_counts(self) -> None:
        for state, instances in (
            ("running", self._running),
            ("starting", self._starting),
            ("draining", self._draining),
        ):
            for role in ROLES:
                count = sum(_role(iid) == role for iid in instances)
                tags = {"namespace": self.config.namespace, "role": role, "state": state}
                self._gauge.set(count, tags=tags)

    # ---- mechanism -----------------------------------------------------------------------------

    async def _apply(self, targets: dict[str, int]) -> None:
        for role, target in targets.items():
            while self._count(role) < target:
                iid = f"{role}-{self._next_index[role]}"
                self._next_index[role] += 1
                handle = start_instance(self.config, iid, self.store_shards, detached=True)
                self._starting[iid] = handle
                self._spawn(self._join(iid, handle))
            while self._count(role) > target:
                await self._remove_one(role)

    async def _remove_one(self, role: str) -> None:
        """The newest instance of the role: one still starting is simply stopped (it has no
        request); a running one is drained."""
        starting = [iid for iid in self._starting if _role(iid) == role]
        if starting:
            iid = max(starting, key=_index)
            ray.kill(self._starting.pop(iid))
            return
        iid = max((i for i in self._running if _role(i) == role), key=_index)
        handle = self._running.pop(iid)
        self._draining[iid] = handle
        self._spawn(self._drain(iid, handle))

    async def _join(self, iid: str, handle: Any) -> None:
        """Wait for the new instance (placement, model load, calibration), then route to it."""
        try:
            load = await asyncio.wait_for(
                handle.load.remote(), timeout=self.config.instance_start_timeout_s
            )
            if iid not in self._starting:  # scaled down while it started
                return
            await self.conductor.add_instance.remote(load, handle)
        except (RayError, TimeoutError) as exc:
            if self._starting.pop(iid, None) is None:
                return  # stopped on purpose by a scale-down
            logger.warning("autoscaler: %s did not start: %s", iid, exc)
            ray.kill(handle)
            self._record(f"{iid} did not start: {type(exc).__name__}")
            return
        if self._starting.pop(iid, None) is not None:
            self._running[iid] = handle
            self._publish_counts()

    async def _drain(self, iid: str, handle: Any) -> None:
        """No new request goes to the instance; once none needs it (or ``drain_timeout_s``
        passed), it is removed and killed."""
        deadline = time.monotonic() + self.config.drain_timeout_s
        while True:
            try:
                await self.conductor.drain_instance.remote(iid)
                while await self.conductor.num_in_flight.remote(iid) or not await self._idle(
                    handle
                ):
                    if time.monotonic() > deadline:
                        left = await self.conductor.num_in_flight.remote(iid)
                        logger.warning("autoscaler: %s drain timed out, %d left", iid, left)
                        self._last_reason = f"{iid}: drain timed out with {left} requests left"
                        break
                    await asyncio.sleep(DRAIN_POLL_S)
                await self.conductor.remove_instance.remote(iid, force=True)
                break
            except RayError as exc:
                # The conductor restarted and lost it, or the instance died: re-sync, retry.
                logger.warning("autoscaler: draining %s: %s", iid, exc)
                await asyncio.sleep(DRAIN_POLL_S)
                await self._sync_conductor()
        self._draining.pop(iid, None)
        ray.kill(handle)
        self._publish_counts()

    async def _idle(self, handle: Any) -> bool:
        """The instance holds no request and no store publication in flight (a dead one is
        idle: there is nothing left to wait for)."""
        try:
            return await handle.is_idle.remote()
        except RayError:
            return True

    async def _sync_conductor(self) -> None:
        """Re-add to a restarted conductor the instances it was not created with."""
        known = await self.conductor.instances.remote()
        missing = {
            iid: handle
            for iid, handle in (*self._running.items(), *self._draining.items())
            if iid not in known
        }
        if not missing:
            return
        loads = await asyncio.gather(
            *(handle.load.remote() for handle in missing.values()), return_exceptions=True
        )
        for (iid, handle), load in zip(missing.items(), loads, strict=True):
            if isinstance(load, BaseException):
                continue  # dead: the driver's retries report it down
            await self.conductor.add_instance.remote(load, handle)
            if iid in self._draining:
                with contextlib.suppress(RayError):
                    await self.conductor.drain_instance.remote(iid)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
