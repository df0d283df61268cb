"""The engine's expert-load accounting against routing recomputed from each MoE layer's input."""

from __future__ import annotations

import copy
import dataclasses
import math
import random

import pytest
import torch
import torch.nn.functional as F

from raycake import LLM, SamplingParams
from raycake.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from raycake.engine.engine_stats import moe_load_since
from raycake.model.config import MoEConfig
from raycake.model.moe import MoEStats
from raycake.policies.routing import SwitchTop1Router
from tests.llama_checkpoints import CONFIGS, build_checkpoint, build_mixtral_checkpoint

NUM_EXPERTS = 4
PARAMS = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixtral-moe-load")
    build_mixtral_checkpoint(out, NUM_EXPERTS)
    return str(out)


def _prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in (7, 19, 30, 12)]


def _llm(model_dir: str, moe: MoEConfig) -> LLM:
    # No prefix cache: every prompt token is computed, so the token count is known exactly.
    # A small step budget makes chunked prefills that share steps with decodes.
    return LLM(
        config=EngineConfig(
            model=model_dir,
            cache=CacheConfig(enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=4),
            moe=moe,
        )
    )


def _record_moe_inputs(llm: LLM) -> dict[int, list[torch.Tensor]]:
    """Each MoE layer's input [T, H] at every forward, by decoder layer index."""
    inputs: dict[int, list[torch.Tensor]] = {}
    for index, layer in enumerate(llm.engine.model.model.layers):
        if llm.engine.model_config.is_moe_layer(index):
            inputs[index] = []
            layer.mlp.register_forward_pre_hook(
                lambda _module, args, seen=inputs[index]: seen.append(args[0].detach().clone())
            )
    return inputs


def _computed_tokens(prompts: list[list[int]], outputs) -> int:
    # Every prompt token and every output token but the last goes through the model once.
    return sum(len(p) + len(o.token_ids) - 1 for p, o in zip(prompts, outputs, strict=True))


def test_switch_capacity_drops_equal_the_overflow_of_each_step(mixtral_dir):
    capacity_factor = 0.5
    llm = _llm(mixtral_dir, MoEConfig(router="switch", capacity_factor=capacity_factor))
    inputs = _record_moe_inputs(llm)
    prompts = _prompts(llm.engine.model_config.vocab_size)
    outputs = llm.generate(prompts, PARAMS)
    stats = llm.engine.moe_stats()
    assert sorted(stats) == sorted(inputs) == [0, 1]  # Mixtral: every layer is MoE
    num_tokens = _computed_tokens(prompts, outputs)
    for index, layer_inputs in inputs.items():
        gate = llm.engine.model.model.layers[index].mlp.gate.weight.detach()
        assigned, kept = [0] * NUM_EXPERTS, [0] * NUM_EXPERTS
        dropped = 0
        for x in layer_inputs:  # one forward per step: capacity counts over the whole step
            choice = F.linear(x.float(), gate.float()).argmax(dim=-1)  # [T] top-1
            capacity = math.ceil(len(choice) / NUM_EXPERTS * capacity_factor)
            for expert, count in enumerate(torch.bincount(choice, minlength=NUM_EXPERTS).tolist()):
                assigned[expert] += count
                kept[expert] += min(count, capacity)
                dropped += max(count - capacity, 0)
        layer = stats[index]
        assert sum(len(x) for x in layer_inputs) == num_tokens
        assert layer.num_assignments == num_tokens  # top-1: one choice per token
        assert layer.assigned_per_expert == assigned
        assert layer.tokens_per_expert == kept
        assert layer.imbalance == pytest.approx(max(assigned) / (num_tokens / NUM_EXPERTS))
        assert layer.num_dropped == dropped > 0
        assert sum(layer.tokens_per_expert) == num_tokens - layer.num_dropped
        assert layer.drop_rate == pytest.approx(dropped / num_tokens)


def test_checkpoint_topk_routing_counts_every_choice_and_drops_none(mixtral_dir):
    llm = _llm(mixtral_dir, MoEConfig())  # Mixtral's own top-2, dropless
    prompts = _prompts(llm.engine.model_config.vocab_size)
    outputs = llm.generate(prompts, PARAMS)
    num_tokens = _computed_tokens(prompts, outputs)
    for layer in llm.engine.moe_stats().values():
        assert layer.num_assignments == 2 * num_tokens
        assert sum(layer.tokens_per_expert) == 2 * num_tokens
        assert layer.num_dropped == 0 and layer.drop_rate == 0.0
        mean = 2 * num_tokens / NUM_EXPERTS
        assert layer.imbalance == pytest.approx(max(layer.tokens_per_expert) / mean)


def test_moe_stats_are_a_copy_and_the_difference_of_two_reads_is_the_load_between(mixtral_dir):
    llm = _llm(mixtral_dir, MoEConfig())
    prompts = _prompts(llm.engine.model_config.vocab_size)
    llm.generate(prompts[:1], PARAMS)
    before = llm.engine.moe_stats()
    before[0].tokens_per_expert[0] += 1000  # the caller's copy, not the engine's
    assert llm.engine.moe_stats()[0].tokens_per_expert[0] < 1000
    before = llm.engine.moe_stats()
    outputs = llm.generate(prompts[1:], PARAMS)
    window = moe_load_since(llm.engine.moe_stats(), before)
    num_tokens = _computed_tokens(prompts[1:], outputs)
    assert all(w.num_assignments == 2 * num_tokens for w in window.values())
    assert all(sum(w.tokens_per_expert) == 2 * num_tokens for w in window.values())


def test_moe_load_since_subtracts_every_count():
    def routing(choices: list[int]):
        logits = torch.zeros(len(choices), NUM_EXPERTS)
        logits[torch.arange(len(choices)), torch.tensor(choices)] = 3.0
        return SwitchTop1Router(capacity_factor=1.0).route(logits)

    first, second = routing([0, 0, 0, 1]), routing([2, 2, 2, 2, 3, 1])
    running = MoEStats(NUM_EXPERTS)
    running.update(first)
    baseline = {5: copy.deepcopy(running)}
    running.update(second)
    expected = MoEStats(NUM_EXPERTS)
    expected.update(second)
    window = moe_load_since({5: running, 7: expected}, baseline)
    assert dataclasses.asdict(window[5]) == dataclasses.asdict(expected)
    assert window[5].num_dropped == 2  # capacity ceil(6 / 4) = 2 of expert 2's four
    assert window[7] == expected and window[7] is not expected  # no baseline: from zero


def test_dense_model_has_no_moe_stats(tmp_path):
    build_checkpoint(CONFIGS[0], tmp_path)
    llm = LLM(str(tmp_path))
    llm.generate([[3, 4, 5]], PARAMS)
    assert llm.engine.moe_stats() == {}
