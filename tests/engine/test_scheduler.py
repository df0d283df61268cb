"""Continuous batching on hand-built requests and a fake runner (no model, no torch)."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from raycake.engine.config import CacheConfig, SchedulerConfig
from raycake.engine.request import Request, RequestStatus
from raycake.engine.sampling_params import SamplingParams
from raycake.engine.scheduler import RequestRejected, Scheduler
from raycake.engine.step_contract import RequestUpdate, RunnerOutput, SchedulerOutput

REPO_ROOT = Path(__file__).resolve().parents[2]
BS = 4
EOS = 1


def token_after(tokens: list[int]) -> int:
    """The fake model: the next token depends only on the sequence so far (never EOS)."""
    return 3 + (sum(tokens) * 31 + len(tokens)) % 997


def expected_outputs(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(token_after(tokens))
    return tokens[len(prompt) :]


@dataclass
class _RunnerState:
    tokens: list[int]
    blocks: list[int]
    num_computed: int


class FakeRunner:
    """Rebuilds each request from the scheduler's deltas, as the real runner does, checks the
    contract on the way, and samples one token per request whose chunk reaches its end."""

    def __init__(self, token_fn: Callable[[list[int]], int] = token_after) -> None:
        self.token_fn = token_fn
        self.states: dict[str, _RunnerState] = {}

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for rid in out.finished_request_ids | out.preempted_request_ids:
            self.states.pop(rid, None)
        for new in out.new_requests:
            assert new.request_id not in self.states
            self.states[new.request_id] = _RunnerState(
                list(new.token_ids), list(new.block_ids), new.num_computed_tokens
            )
        for cached in out.cached_requests:
            state = self.states[cached.request_id]
            assert state.num_computed == cached.num_computed_tokens
            state.blocks += cached.new_block_ids
        sent = {d.request_id for d in out.new_requests} | {
            d.request_id for d in out.cached_requests
        }
        assert set(out.num_scheduled_tokens) == sent
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        kinds = []  # NOTE: decodes (1 token reaching the end) must come before prefill chunks
        for rid, n in out.num_scheduled_tokens.items():
            state = self.states[rid]
            kinds.append(n == 1 and state.num_computed + 1 == len(state.tokens))
        assert kinds == sorted(kinds, reverse=True), out.num_scheduled_tokens
        sampled = {}
        for rid, n in out.num_scheduled_tokens.items():
            state = self.states[rid]
            state.num_computed += n
            assert state.num_computed <= len(state.tokens)
            assert state.num_computed <= len(state.blocks) * BS, "no cache slot for a token"
            if state.num_computed == len(state.tokens):
                token = self.token_fn(state.tokens)
                state.tokens.append(token)
                sampled[rid] = [token]
        return RunnerOutput(sampled_token_ids=sampled)


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 64,
    max_num_seqs: int = 8,
    max_prefill_chunk: int = 64,
    max_model_len: int = 256,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=max_num_seqs,
            max_prefill_chunk=max_prefill_chunk,
        ),
        CacheConfig(
            block_size=BS, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching
        ),
        num_blocks,
        max_model_len,
    )


def make_request(rid: str, prompt: list[int], max_tokens: int = 4, **params) -> Request:
    return Request(
        rid, prompt, SamplingParams(max_tokens=max_tokens, **params), eos_token_ids=(EOS,)
    )


def step(sched: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[RequestUpdate]]:
    out = sched.schedule()
    sched.check_invariants()
    assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
    runner_output = runner.execute(out)
    updates = sched.update_from_output(out, runner_output)
    sched.check_invariants()
    for request in sched.running:  # the runner's copy agrees with the scheduler's
        state = runner.states[request.request_id]
        assert state.tokens == request.all_token_ids
        assert state.blocks == sched.kv_cache.block_ids(request.request_id)
    return out, updates


def run_to_completion(
    sched: Scheduler, runner: FakeRunner, max_steps: int = 500
) -> dict[str, tuple[list[int], str]]:
    """Step until idle; (all output tokens, finish reason) of each request that finished."""
    requests = dict(sched.requests)  # finished requests leave the scheduler
    results = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return results
        for update in step(sched, runner)[1]:
            if update.finish_reason is not None:
                outputs = requests[update.request_id].output_token_ids
                results[update.request_id] = (outputs, update.finish_reason)
    raise AssertionError(f"not finished after {max_steps} steps: {sched.requests}")


def test_scheduler_and_kv_cache_import_without_torch_or_ray():
    # The stub package skips raycake/__init__.py, which imports the torch engine (LLM).
    code = (
        "import sys, types; sys.modules['torch'] = None; sys.modules['ray'] = None\n"
        f"pkg = types.ModuleType('raycake'); pkg.__path__ = [{str(REPO_ROOT / 'raycake')!r}]\n"
        "sys.modules['raycake'] = pkg\n"
        "import raycake.engine.scheduler, raycake.engine.kv_cache, raycake.policies.eviction\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_budget_caps_the_step_and_admission_is_fifo():
    sched, runner = make_scheduler(budget=32), FakeRunner()
    for i in range(3):
        sched.add_request(make_request(f"r{i}", list(range(100 * i, 100 * i + 20))))
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {"r0": 20, "r1": 12}  # r2 waits: the budget is spent
    assert sched.num_waiting == 1
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {"r0": 1, "r1": 8, "r2": 20}
    assert [d.request_id for d in out.new_requests] == ["r2"]


def test_a_long_prompt_is_prefilled_in_chunks():
    sched, runner = make_scheduler(budget=32, max_prefill_chunk=16), FakeRunner()
    sched.add_request(make_request("a", list(range(40))))
    expected = [(16, [0, 1, 2, 3], 0), (16, [4, 5, 6, 7], 16), (8, [8, 9], 32)]
    for i, (num_tokens, blocks, computed) in enumerate(expected):
        out, updates = step(sched, runner)
        assert out.num_scheduled_tokens == {"a": num_tokens}
        data = out.new_requests[0] if i == 0 else out.cached_requests[0]
        assert (data.block_ids if i == 0 else data.new_block_ids) == blocks
        assert data.num_computed_tokens == computed
        # Only the chunk that reaches the end of the prompt samples.
        assert [u.new_token_ids for u in updates] == (
            [[token_after(list(range(40)))]] if i == 2 else []
        )
    assert sched.get_request("a").num_computed_tokens == 40


def test_decodes_are_scheduled_before_prefill_chunks():
    sched, runner = make_scheduler(budget=32, max_prefill_chunk=16), FakeRunner()
    sched.add_request(make_request("long", list(range(48))))
    sched.add_request(make_request("short", [7, 8, 9, 10]))
    out, _ = step(sched, runner)
    assert list(out.num_scheduled_tokens.items()) == [("long", 16), ("short", 4)]
    out, _ = step(sched, runner)
    # "long" was admitted first but is still prefilling; "short" decodes.
    assert list(out.num_scheduled_tokens.items()) == [("short", 1), ("long", 16)]


def test_shared_prefix_is_served_from_the_cache():
    sched, runner = make_scheduler(), FakeRunner()
    prompt_a = list(range(10, 20))  # 10 tokens: two full blocks
    sched.add_request(make_request("a", prompt_a, max_tokens=6))
    step(sched, runner)
    blocks_a = sched.kv_cache.block_ids("a")
    prompt_b = [*prompt_a[:8], 50, 51, 52]
    sched.add_request(make_request("b", prompt_b, max_tokens=6))
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {"a": 1, "b": 3}  # b computes only its suffix
    (new,) = out.new_requests
    assert new.num_computed_tokens == 8 and new.block_ids[:2] == blocks_a[:2]
    assert sched.get_request("b").num_cached_tokens == 8
    stats = sched.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (10 + 11, 8)
    # Every block of a's prompt is cached, yet the last token still runs to give logits.
    sched.add_request(make_request("c", prompt_a[:8], max_tokens=6))
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens["c"] == 4 and sched.get_request("c").num_cached_tokens == 4
    results = run_to_completion(sched, runner)
    for rid, prompt in (("a", prompt_a), ("b", prompt_b), ("c", prompt_a[:8])):
        assert results[rid] == (expected_outputs(prompt, 6), "length")


def test_newest_request_is_preempted_and_recomputed_when_blocks_run_out():
    sched, runner = make_scheduler(num_blocks=5, enable_prefix_caching=False), FakeRunner()
    prompt_a, prompt_b = [5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 25]
    sched.add_request(make_request("a", prompt_a, max_tokens=10))
    sched.add_request(make_request("b", prompt_b, max_tokens=10))
    for _ in range(3):  # 6 prompt tokens + 2 decodes: both have 8 computed tokens in 2 blocks
        step(sched, runner)
    out, _ = step(sched, runner)
    assert out.preempted_request_ids == {"b"} and out.num_scheduled_tokens == {"a": 1}
    b = sched.get_request("b")
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert sched.waiting[0] is b and sched.kv_cache.block_ids("b") == []
    results = run_to_completion(sched, runner)
    assert results["a"] == (expected_outputs(prompt_a, 10), "length")
    assert results["b"] == (expected_outputs(prompt_b, 10), "length")
    assert sched.stats().num_preemptions >= 1


def test_a_decode_already_scheduled_this_step_can_be_preempted():
    sched = make_scheduler(num_blocks=7, budget=16, max_prefill_chunk=8)
    runner = FakeRunner()
    sched.add_request(make_request("a", list(range(100, 124)), max_tokens=2))  # 7 blocks at most
    sched.add_request(make_request("b", [1, 2, 3], max_tokens=10))
    step(sched, runner)
    step(sched, runner)
    out, _ = step(sched, runner)
    # b (newer) was given its decode first, then a's chunk found no block: b gives it back.
    assert out.preempted_request_ids == {"b"} and out.num_scheduled_tokens == {"a": 8}
    assert [d.request_id for d in out.cached_requests] == ["a"]
    results = run_to_completion(sched, runner)
    assert results["b"] == (expected_outputs([1, 2, 3], 10), "length")


def test_requests_that_can_never_fit_are_rejected_with_the_numbers():
    sched = make_scheduler(num_blocks=4, max_model_len=32)
    with pytest.raises(RequestRejected, match=r"'x': prompt of 30 tokens \+ max_tokens 4 = 34 "):
        sched.add_request(make_request("x", list(range(30))))
    with pytest.raises(
        RequestRejected,
        match=r"'y': prompt of 14 tokens \+ max_tokens 4 needs 5 KV blocks of 4 tokens, but the cache has only 4",
    ):
        sched.add_request(make_request("y", list(range(14)), max_tokens=4))
    sched.add_request(make_request("z", list(range(13)), max_tokens=4))  # 16 KV slots: fits
    with pytest.raises(ValueError, match="'z': a request with this id is already") as info:
        sched.add_request(make_request("z", [1]))
    assert not isinstance(info.value, RequestRejected)
    assert sched.num_waiting == 1


SCRIPT = [5, 6, EOS, 7, 8, 9]


@pytest.mark.parametrize(
    "params, outputs, reason",
    [
        ({"max_tokens": 6}, [5, 6, EOS], "stop"),
        ({"max_tokens": 5, "ignore_eos": True}, [5, 6, EOS, 7, 8], "length"),
        ({"max_tokens": 6, "stop_token_ids": [6]}, [5, 6], "stop"),
        ({"max_tokens": 2}, [5, 6], "length"),
        ({"max_tokens": 3}, [5, 6, EOS], "stop"),  # stop wins over length on the same token
    ],
)
def test_finish_reasons(params, outputs, reason):
    sched = make_scheduler()
    runner = FakeRunner(token_fn=lambda tokens: SCRIPT[len(tokens) - 4])
    sched.add_request(make_request("r", [40, 41, 42, 43], **params))
    assert run_to_completion(sched, runner) == {"r": (outputs, reason)}
    assert sched.kv_cache.num_free_blocks == 64


def test_abort_frees_waiting_and_running_requests():
    sched, runner = make_scheduler(max_num_seqs=1), FakeRunner()
    sched.add_request(make_request("run", list(range(9))))
    sched.add_request(make_request("wait", list(range(9))))
    step(sched, runner)
    assert (sched.num_running, sched.num_waiting) == (1, 1)
    sched.finish_requests(["wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    sched.check_invariants()
    out = sched.schedule()  # "run" decodes; abort it mid-step, before the runner returns
    sched.finish_requests(["run"], RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out, runner.execute(out)) == []
    sched.check_invariants()
    assert not sched.has_unfinished_requests() and sched.kv_cache.num_free_blocks == 64
    out, _ = step(sched, runner)
    assert out.is_empty and out.finished_request_ids == {"run"}
    assert runner.states == {}
    with pytest.raises(ValueError, match="finished status"):
        sched.finish_requests(["x"], RequestStatus.RUNNING)


def test_a_token_for_an_unfinished_chunk_breaks_the_contract_and_fails_only_that_request():
    sched = make_scheduler(max_prefill_chunk=4)
    free = sched.kv_cache.num_free_blocks
    sched.add_request(make_request("r", list(range(10))))
    sched.add_request(make_request("ok", list(range(20, 30))))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"r": 4, "ok": 4}
    # "ok" computed a chunk that samples nothing: it advances without an update.
    [bad] = sched.update_from_output(out, RunnerOutput(sampled_token_ids={"r": [3]}))
    assert (bad.request_id, bad.new_token_ids, bad.finish_reason) == ("r", [], "error")
    assert "did not reach its last known token" in bad.error
    assert sched.get_request("r") is None and sched.get_request("ok").num_computed_tokens == 4
    sched.check_invariants()
    sched.finish_requests(["ok"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache.num_free_blocks == free


def test_runner_errors_fail_their_requests_and_free_held_blocks():
    sched = make_scheduler()
    free = sched.kv_cache.num_free_blocks
    held = make_request("held", list(range(6)))
    held.hold_kv_on_finish = True  # an error frees the blocks even of a request holding them
    sched.add_request(held)
    sched.add_request(make_request("ok", list(range(40, 46))))
    out = sched.schedule()
    updates = sched.update_from_output(
        out, RunnerOutput(sampled_token_ids={"ok": [7]}, errors={"held": "sampling: boom"})
    )
    assert [(u.request_id, u.new_token_ids, u.finish_reason, u.error) for u in updates] == [
        ("held", [], "error", "sampling: boom"),
        ("ok", [7], None, None),
    ]
    assert "held" not in sched.held
    sched.check_invariants()
    assert sched.fail_requests(["ok", "unknown"], "step failed") == ["ok"]
    sched.check_invariants()
    assert sched.kv_cache.num_free_blocks == free and not sched.has_unfinished_requests()


def test_random_traffic_keeps_invariants_and_finishes_every_request():
    rng = random.Random(0)
    sched = make_scheduler(
        num_blocks=24, budget=32, max_num_seqs=6, max_prefill_chunk=16, max_model_len=96
    )
    runner = FakeRunner()
    bases = [[rng.randrange(3, 1000) for _ in range(40)] for _ in range(3)]  # shared prefixes
    prompts: dict[str, tuple[list[int], int]] = {}
    aborted: set[str] = set()
    tokens: dict[str, list[int]] = {}
    results: dict[str, str] = {}
    for i in range(400):
        if i < 200 and rng.random() < 0.3:
            prompt = rng.choice(bases)[: rng.randint(1, 40)] + [
                rng.randrange(3, 1000)
            ] * rng.randint(0, 8)
            max_tokens = rng.randint(1, 30)
            request = make_request(f"r{i}", prompt, max_tokens=max_tokens)
            try:
                sched.add_request(request)
                prompts[request.request_id] = (prompt, max_tokens)
            except RequestRejected:
                assert -(-(len(prompt) + max_tokens - 1) // BS) > 24
        if sched.requests and rng.random() < 0.03:
            victim = rng.choice(sorted(sched.requests))
            sched.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
            aborted.add(victim)
            sched.check_invariants()
        for update in step(sched, runner)[1]:
            tokens.setdefault(update.request_id, []).extend(update.new_token_ids)
            if update.finish_reason is not None:
                results[update.request_id] = update.finish_reason
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache.num_free_blocks == 24
    stats = sched.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0  # the run exercised both
    assert len(prompts) > 40 and aborted
    for rid, (prompt, max_tokens) in prompts.items():
        if rid in aborted:
            assert rid not in results
        else:
            assert results[rid] == "length"
            assert tokens[rid] == expected_outputs(prompt, max_tokens)
