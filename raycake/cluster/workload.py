"""A multi-turn chat-like workload whose turns share prefixes, and its summary statistics."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

from raycake.cluster.cluster import Cluster, ClusterOutput
from raycake.engine.sampling_params import SamplingParams

OPENERS = [
    "def parse_config(path):\n",
    "class LRUCache:\n    def __init__(self, capacity):\n",
    "import json\nimport os\n\n\ndef load(path):\n",
    "async def fetch(session, url):\n",
    "def merge_sort(items):\n",
    "class Matrix:\n    def __mul__(self, other):\n",
]
FOLLOW_UPS = [
    "\n\ndef test_it():\n",
    "\n\nif __name__ == '__main__':\n",
    "\n    # handle the error case\n",
    "\n\nclass Helper:\n",
]


@dataclass(frozen=True)
class WorkloadSummary:
    num_requests: int
    num_rejected: int
    num_errors: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    tbt_p50_ms: float
    tbt_p90_ms: float
    tbt_p99_ms: float
    prompt_tokens: int
    cached_tokens: int
    store_blocks: int
    kv_bytes: int

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def run_multi_turn(
    cluster: Cluster,
    num_sessions: int = 6,
    num_turns: int = 3,
    max_tokens: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[ClusterOutput], WorkloadSummary]:
    """Each session's next prompt is its previous prompt + answer + a follow-up line."""
    rng = random.Random(seed)
    prompts = [rng.choice(OPENERS) for _ in range(num_sessions)]
    params = SamplingParams(temperature=0.7, top_p=0.95, seed=seed, max_tokens=max_tokens)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_sessions * num_turns, desc="demo", unit="req")
    outputs: list[ClusterOutput] = []
    for _ in range(num_turns):
        turn = cluster.generate(prompts, params)
        outputs.extend(turn)
        prompts = [p + o.text + rng.choice(FOLLOW_UPS) for p, o in zip(prompts, turn, strict=True)]
        if bar is not None:
            bar.update(len(turn))
    if bar is not None:
        bar.close()
    return outputs, summarize(outputs)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(outputs: list[ClusterOutput]) -> WorkloadSummary:
    served = [o for o in outputs if o.finish_reason in ("stop", "length")]
    ttft = [1000 * o.ttft_s for o in served if o.ttft_s is not None]
    tbt = [1000 * gap for o in served for gap in o.tbt_s]
    return WorkloadSummary(
        num_requests=len(outputs),
        num_rejected=sum(o.finish_reason == "rejected" for o in outputs),
        num_errors=sum(o.finish_reason == "error" for o in outputs),
        ttft_p50_ms=_percentile(ttft, 50),
        ttft_p90_ms=_percentile(ttft, 90),
        ttft_p99_ms=_percentile(ttft, 99),
        tbt_p50_ms=_percentile(tbt, 50),
        tbt_p90_ms=_percentile(tbt, 90),
        tbt_p99_ms=_percentile(tbt, 99),
        prompt_tokens=sum(len(o.prompt_token_ids) for o in served),
        cached_tokens=sum(o.num_cached_tokens for o in served),
        store_blocks=sum(o.num_store_blocks for o in served),
        kv_bytes=sum(o.kv_bytes for o in served),
    )
