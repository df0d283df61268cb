"""EAGLE across the prefill-to-decode hand-off: the target features travel with the KV, so the
decode instance drafts as well as a single engine does on the same prompts."""

from __future__ import annotations

import pytest
import ray

from raycake import LLM, SamplingParams
from raycake.cluster.cluster import Cluster
from raycake.cluster.config import ClusterConfig
from raycake.engine.config import EngineConfig
from raycake.engine.spec.config import SpeculativeConfig
from tests.ray_fixture import ray_session  # noqa: F401 - the session fixture

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "for i in range(10):\n    print(i)\n",
]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
ENGINE = EngineConfig(speculative=SpeculativeConfig(draft_model="default", num_draft_tokens=4))


def test_acceptance_in_the_cluster_matches_the_single_engine(ray_session):  # noqa: F811
    with LLM(config=ENGINE) as llm:
        single = llm.generate(PROMPTS, GREEDY)
        single_stats = llm.engine.spec_stats()
    cluster = Cluster.from_config(
        ClusterConfig(namespace="raycake-test-eagle", engine=ENGINE, num_store_shards=0)
    )
    decode = cluster.decode["decode-0"]
    try:
        before = ray.get(decode.spec_stats.remote())  # the instance's start-up calibration
        outputs = cluster.generate(PROMPTS, GREEDY)
        after = ray.get(decode.spec_stats.remote())
    finally:
        cluster.shutdown()
    emitted = after.num_emitted_tokens - before.num_emitted_tokens
    cluster_acceptance = emitted / (after.num_verify_steps - before.num_verify_steps)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in single]
    assert single_stats.mean_acceptance_length > 2.0  # the shipped head drafts well here
    assert cluster_acceptance == pytest.approx(single_stats.mean_acceptance_length, rel=0.05)


pytestmark = pytest.mark.slow
