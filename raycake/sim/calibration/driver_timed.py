"""The simulated cluster timed as the real cluster's driver times it.

The simulator's TTFT ends when a request's KV lands on its decode instance, and its first
token interval runs from there to the end of the first decode step it takes part in. The real
driver (``Cluster.astream``) records the first token when the prefill result arrives, before
the KV moves; the move, and the decode actor's hand-off (fetching and importing the KV,
starting the token stream), then fall in the first token interval. ``DriverTimedCluster``
keeps the simulator's event loop and moves that boundary: the request's first token is stamped
at the end of its prefill, and it joins the decode batch ``handoff_s`` after its KV landed.

NOTE: a subclass of ``event_loop.SimulatedCluster`` that relies on two of its internals:
``_transfer_done`` (the KV landed: stamp ``first_token_s`` and queue for the batch) and
``SimRequest.first_token_s`` (the start of the first token interval and the end of TTFT).
"""

from __future__ import annotations

import pyarrow as pa

from raycake.policies.cluster_view import SchedulingPolicy
from raycake.sim.config import SimulationConfig
from raycake.sim.event_loop import SimulatedCluster
from raycake.sim.instances import SimRequest
from raycake.sim.results import SimulationResult

_TRANSFER_DONE = 1  # event_loop's event kind for "KV landed" (dispatched to _transfer_done)


class DriverTimedCluster(SimulatedCluster):
    """``SimulatedCluster`` with the driver's TTFT boundary and a decode hand-off delay."""

    def __init__(
        self,
        trace: pa.Table,
        policy: SchedulingPolicy,
        config: SimulationConfig,
        handoff_s: float = 0.0,
    ) -> None:
        if not isinstance(handoff_s, (int, float)) or not 0 <= handoff_s < float("inf"):
            raise ValueError(f"handoff_s: expected a finite number >= 0, got {handoff_s!r}")
        super().__init__(trace, policy, config)
        self.handoff_s = float(handoff_s)
        # request index -> when its prefill ended (the driver's first token)
        self._prefill_end_s: dict[int, float] = {}

    def _transfer_done(self, r: SimRequest) -> None:
        if r.index not in self._prefill_end_s:
            # The KV landed now; it left when the prefill ended, one transfer time ago.
            transfer_s = r.num_prompt_tokens * self.kv_bytes_per_token / self.bandwidth
            self._prefill_end_s[r.index] = self.now - transfer_s
            if self.handoff_s > 0:
                self._push(self.now + self.handoff_s, _TRANSFER_DONE, r)
                return
        prefill_end_s = self._prefill_end_s.pop(r.index)
        if r.num_decode_tokens == 0:
            # Finished at its first token: recorded at once, as of the prefill's end.
            now, self.now = self.now, prefill_end_s
            super()._transfer_done(r)
            self.now = now
            return
        super()._transfer_done(r)
        r.first_token_s = prefill_end_s


def simulate_as_driver(
    trace: pa.Table, policy: SchedulingPolicy, config: SimulationConfig, handoff_s: float = 0.0
) -> SimulationResult:
    """``simulate`` with the real driver's timing boundaries (see the module docstring)."""
    if not isinstance(policy, SchedulingPolicy):
        raise ValueError(f"policy: expected a SchedulingPolicy, got {policy!r}")
    if not isinstance(config, SimulationConfig):
        raise ValueError(f"config: expected a SimulationConfig, got {config!r}")
    if trace.num_rows == 0:
        raise ValueError("trace: no requests")
    return DriverTimedCluster(trace, policy, config, handoff_s).run()
