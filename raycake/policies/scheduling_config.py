"""The conductor's scheduling policy by name and its options.

NOTE: it lives with the policies, not with the cluster's config, because the simulator builds
the same policies from it and policies never import the layers below them."""

from __future__ import annotations

from dataclasses import dataclass

from raycake.validation import require

SCHEDULING_POLICY_NAMES = (
    "cache_aware",
    "dynamo_kv",
    "least_loaded",
    "random",
    "round_robin",
    "sglang_cache_aware",
)


@dataclass(frozen=True)
class SchedulingConfig:
    """The conductor's policy by name and its options; the cache-aware ones apply only to it."""

    policy: str = "cache_aware"
    # Cluster-wide SLOs the conductor stamps on requests that set none; None: no SLO.
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    # Fetch a longer store prefix only when it is over this many times the local one.
    balance_threshold: float = 1.0
    enable_early_rejection: bool = True
    predictive_rejection: bool = False
    use_store: bool = True
    seed: int = 0  # for the random policy
    # The conductor's early rejection applied to a baseline router's choice (AdmissionControl;
    # with ``predictive_rejection``, prediction-based), so baselines can be compared with the
    # conductor at equal admission control. A separate switch rather than the baselines
    # honouring ``enable_early_rejection``: that one defaults to True (the conductor's
    # deployment), and a baseline must stay the admit-everything router unless asked.
    baseline_admission: bool = False

    def __post_init__(self) -> None:
        require(
            self.policy in SCHEDULING_POLICY_NAMES,
            "scheduling.policy",
            f"one of {list(SCHEDULING_POLICY_NAMES)}",
            self.policy,
        )
        for name in ("ttft_slo_s", "tbt_slo_s"):
            value = getattr(self, name)
            if value is not None:
                require(
                    isinstance(value, (int, float)) and 0 < value < float("inf"),
                    f"scheduling.{name}",
                    "a finite number > 0 (seconds)",
                    value,
                )
        require(
            isinstance(self.balance_threshold, (int, float))
            and 1.0 <= self.balance_threshold < float("inf"),
            "scheduling.balance_threshold",
            "a finite number >= 1.0",
            self.balance_threshold,
        )
        for name in (
            "enable_early_rejection",
            "predictive_rejection",
            "use_store",
            "baseline_admission",
        ):
            require(
                isinstance(getattr(self, name), bool),
                f"scheduling.{name}",
                "a bool",
                getattr(self, name),
            )
        require(
            not (self.baseline_admission and self.policy == "cache_aware"),
            "scheduling.baseline_admission",
            "False for cache_aware (its admission control is enable_early_rejection)",
            self.baseline_admission,
        )
        require(
            isinstance(self.seed, int) and not isinstance(self.seed, bool),
            "scheduling.seed",
            "an integer",
            self.seed,
        )
