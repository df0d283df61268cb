"""Expert capacity on the embedded MoE model: tokens dropped, expert imbalance and held-out loss
at capacity factors 1.0, 1.25 and 2.0 beside dropless routing, on the same windows in one run.

    python -m benchmarks.moe_capacity [--model default-moe] [--capacity-factors 1.0 1.25 2.0]
        [--group-tokens 4096] [--max-windows 128] [--dtype float32]

Held-out text is the trainer's: the stdlib files ``split_corpus`` holds out, encoded by
``encode_corpus`` with the model folder's tokenizer and cut into the consecutive, non-overlapping
``seq_len`` windows that ``evaluate`` scores. Windows are routed ``group_tokens`` at a time
(default 16 x 256 = 4,096, one training batch). NOTE: capacity is per routing group,
ceil(group_tokens / E x capacity_factor) tokens per expert, so one factor drops more from small
groups, whose loads are noisier.

Per MoE layer and over all of them:

- ``drop_rate``: fraction of tokens whose expert was full (they pass through the residual only);
- ``routed_imbalance``: the busiest expert's load over the mean load within a group, on the
  router's choices before drops (mean over groups); ``kept_imbalance``: the same on kept tokens;
- ``loss``: held-out cross-entropy (nats/token), so the quality cost of dropping shows.

Then the same capacity factors as the Switch Transformer paper reports them (``SWITCH_PAPER``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from benchmarks.common import positive_float, print_table, write_table
from raycake.assets import DEFAULT_MOE_MODEL_NAME
from raycake.model.config import MoEConfig
from raycake.model.loader import (
    DTYPES,
    load_model,
    read_model_config,
    resolve_model_path,
)
from raycake.model.moe import MoEFeedForward
from raycake.training.corpus import read_texts, split_corpus
from raycake.training.trainer import encode_corpus

SEQ_LEN = 256  # the trainer's held-out window (TrainConfig.seq_len)
GROUP_TOKENS = 16 * SEQ_LEN  # one training batch, routed as one group
DEFAULT_HELD_OUT_PERCENT = 2  # TrainConfig.held_out_percent, when the folder has no train report


class PaperRow(NamedTuple):
    """One Switch-Base row of Table 1 (a model trained at that capacity factor)."""

    capacity_factor: float
    neg_log_perplexity: float  # after 100k steps, nats, higher is better
    hours_to_threshold: float  # to neg. log perplexity -1.50, lower is better
    examples_per_s: float


# Fedus, Zoph, Shazeer, "Switch Transformers" (arXiv:2101.03961v3, JMLR 2022), Table 1:
# Switch-Base, 128 experts in every other feed-forward layer, masked LM on C4, 32 TPUv3 cores.
SWITCH_PAPER = (
    PaperRow(capacity_factor=1.0, neg_log_perplexity=-1.561, hours_to_threshold=62.8, examples_per_s=1000),
    PaperRow(capacity_factor=1.25, neg_log_perplexity=-1.553, hours_to_threshold=65.0, examples_per_s=910),
    PaperRow(capacity_factor=2.0, neg_log_perplexity=-1.554, hours_to_threshold=72.8, examples_per_s=860),
)  # fmt: skip
SWITCH_PAPER_NOTES = (
    "Sec. 2.2, eq. 3: expert capacity = (tokens per batch / number of experts) x capacity "
    "factor; a token past its expert's capacity skips the layer through the residual.",
    "Sec. 2.2: tokens dropped were 'typically < 1%' throughout their experiments, with no "
    "dependency on the number of experts; the load-balancing loss (alpha = 1e-2) 'ensured good "
    "load balancing'. No drop rate per capacity factor and no imbalance figure was found.",
    "Sec. 2.3 on Table 1: 'Switch Transformers perform better at lower capacity factors "
    "(1.0, 1.25)'. After 100k steps 1.25 and 2.0 tie (-1.553, -1.554) and 1.0 trails by "
    "0.007 nats, but 1.0 is fastest and reaches the quality threshold first.",
    "App. F (pseudo code): capacity is per core, over its tokens_per_core: the routing group, "
    "as --group-tokens is here.",
    "App. B: rerouting overflowed tokens to their second expert (No-Token-Left-Behind) showed "
    "'no empirical benefits'.",
    "NOTE: the paper trains one model per capacity factor (masked LM on C4, so absolute "
    "losses do not compare); here one model, trained at its own factor, is evaluated at each.",
)


@dataclass(frozen=True)
class LayerLoad:
    """Tokens per expert in each routing group of one MoE layer (or several layers, stacked)."""

    routed: np.ndarray  # [G, E] the router's choices, before drops
    kept: np.ndarray  # [G, E] the tokens each expert computed

    @property
    def num_tokens(self) -> int:
        return int(self.routed.sum())

    @property
    def drop_rate(self) -> float:
        # NOTE: top-1, so tokens and (token, choice) pairs are the same count.
        return 1.0 - self.kept.sum() / self.num_tokens if self.num_tokens else 0.0

    @property
    def routed_imbalance(self) -> float:
        return _mean_group_imbalance(self.routed)

    @property
    def kept_imbalance(self) -> float:
        return _mean_group_imbalance(self.kept)

    @property
    def routed_imbalance_over_run(self) -> float:
        """Over the run's total load per expert, as ``MoEStats`` and so the train report count
        it (stacked layers pool their experts by index, as ``MoEStats`` does)."""
        return _mean_group_imbalance(self.routed.sum(axis=0, keepdims=True))

    @property
    def kept_imbalance_over_run(self) -> float:
        return _mean_group_imbalance(self.kept.sum(axis=0, keepdims=True))


def _mean_group_imbalance(counts: np.ndarray) -> float:
    """Mean over groups [G, E] of the busiest expert's load over the mean: 1.0 balanced, E worst."""
    totals = counts.sum(axis=1)  # [G]
    loaded = totals > 0
    if not loaded.any():
        return 1.0
    return float((counts.max(axis=1)[loaded] * counts.shape[1] / totals[loaded]).mean())


@dataclass(frozen=True)
class CapacityResult:
    """One capacity factor over all windows."""

    capacity_factor: float | None  # None: dropless
    capacity: int | None  # tokens per expert per routing group; None: dropless
    group_tokens: int
    loss: float  # held-out cross-entropy, nats/token
    layers: dict[int, LayerLoad]  # decoder layer index -> its load

    @property
    def overall(self) -> LayerLoad:
        """Every MoE layer's groups stacked: pooled drop rate, imbalance averaged over all."""
        loads = list(self.layers.values())
        return LayerLoad(
            np.concatenate([x.routed for x in loads]), np.concatenate([x.kept for x in loads])
        )


def held_out_windows(
    model_dir: Path,
    seq_len: int,
    max_windows: int,
    held_out_percent: int = DEFAULT_HELD_OUT_PERCENT,
    max_corpus_files: int | None = None,
) -> torch.Tensor:
    """The first ``max_windows`` windows [N, S + 1] that the trainer's ``evaluate`` scores.

    ``held_out_percent`` and ``max_corpus_files`` are the training run's, so the split and the
    token stream are the ones the model was evaluated on (and never trained on).
    """
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    files = split_corpus(held_out_percent=held_out_percent).held_out[:max_corpus_files]
    return token_windows(encode_corpus(tokenizer, list(read_texts(files))), seq_len, max_windows)


def token_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """Window i is tokens[i * S : i * S + S + 1]: inputs and their next-token targets."""
    num_windows = min(max_windows, (len(tokens) - 1) // seq_len)
    starts = np.arange(num_windows) * seq_len
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(windows)  # [N, S + 1]


def check_switch_checkpoint(model_dir: str | Path) -> None:
    config = read_model_config(model_dir)
    if not config.num_experts or config.router_type != "switch":
        raise ValueError(
            f"{model_dir}: {config.architecture} with router_type {config.router_type!r}; "
            "expert capacity applies to a Switch (top-1) MoE checkpoint"
        )


def measure(
    model_dir: str | Path,
    windows: torch.Tensor,
    capacity_factor: float | None,
    group_tokens: int = GROUP_TOKENS,
    dtype: str = "float32",
) -> CapacityResult:
    """Score ``windows`` [N, S + 1] with Switch routing at ``capacity_factor`` (None: dropless).

    Legend: N windows, S window length, W windows per routing group, E experts, V vocabulary.
    """
    num_windows, seq_len = windows.shape[0], windows.shape[1] - 1
    if group_tokens % seq_len:
        raise ValueError(f"group_tokens: {group_tokens} is not a multiple of seq_len {seq_len}")
    per_group = group_tokens // seq_len
    if num_windows == 0 or num_windows % per_group:
        raise ValueError(f"{num_windows} windows do not make whole groups of {per_group}")
    check_switch_checkpoint(model_dir)
    model = load_model(
        model_dir, dtype=dtype, moe=MoEConfig(router="switch", capacity_factor=capacity_factor)
    )
    moe_layers = {
        i: layer.mlp
        for i, layer in enumerate(model.model.layers)
        if isinstance(layer.mlp, MoEFeedForward)
    }
    num_experts = model.config.num_experts
    routed = {i: [] for i in moe_layers}
    kept = {i: [] for i in moe_layers}
    positions = torch.arange(seq_len).expand(per_group, seq_len)  # [W, S]
    total_loss = 0.0
    with torch.inference_mode():
        for start in range(0, num_windows, per_group):
            group = windows[start : start + per_group]  # [W, S + 1]
            inputs, targets = group[:, :-1], group[:, 1:]  # [W, S] each
            logits = model.compute_logits(model(inputs, positions))  # [W, S, V]
            total_loss += F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), reduction="sum"
            ).item()
            for i in moe_layers:
                routing = model.model.layers[i].last_routing
                assert routing is not None and routing.num_tokens == group_tokens
                choices = routing.expert_indices.flatten()  # [W * S]
                routed[i].append(torch.bincount(choices, minlength=num_experts))  # [E]
                kept[i].append(routing.tokens_per_expert)  # [E]
    router = next(iter(moe_layers.values())).router
    return CapacityResult(
        capacity_factor=capacity_factor,
        capacity=router.capacity(group_tokens, num_experts),
        group_tokens=group_tokens,
        loss=total_loss / (num_windows * seq_len),
        layers={
            i: LayerLoad(torch.stack(routed[i]).numpy(), torch.stack(kept[i]).numpy())
            for i in moe_layers
        },
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every flag; ``args.model_dir`` is the resolved checkpoint folder."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MOE_MODEL_NAME,
        help="embedded model name or Switch-Llama checkpoint folder (default: %(default)s)",
    )
    parser.add_argument(
        "--capacity-factors",
        type=positive_float,
        nargs="+",
        default=[1.0, 1.25, 2.0],
        help="capacity factors to compare with dropless routing (default: %(default)s)",
    )
    parser.add_argument(
        "--group-tokens",
        type=int,
        default=GROUP_TOKENS,
        help="tokens per routing call, a multiple of --seq-len; capacity is per group "
        "(default: %(default)s, one training batch)",
    )
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument(
        "--max-windows",
        type=int,
        default=128,
        help="held-out windows to score, rounded down to whole groups (default: %(default)s)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    for flag in ("group_tokens", "seq_len", "max_windows"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    try:
        args.model_dir = resolve_model_path(args.model)
        check_switch_checkpoint(args.model_dir)  # reads config.json
    except ValueError as exc:  # CheckpointError is one
        parser.error(f"--model: {exc}")
    if not (args.model_dir / "tokenizer.json").is_file():
        parser.error(f"--model: {args.model_dir / 'tokenizer.json'} not found")
    if args.group_tokens % args.seq_len:
        parser.error(
            f"--group-tokens: {args.group_tokens} is not a multiple of --seq-len {args.seq_len}"
        )
    if args.max_windows * args.seq_len < args.group_tokens:
        parser.error(
            f"--max-windows: {args.max_windows} windows of {args.seq_len} tokens are fewer "
            f"than one routing group of --group-tokens {args.group_tokens}"
        )
    args.capacity_factors = sorted(set(args.capacity_factors))
    return args


def result_rows(result: CapacityResult, dropless_loss: float) -> list[dict]:
    """One row per MoE layer and one over all of them ("all")."""
    setting = "dropless" if result.capacity_factor is None else str(result.capacity_factor)
    loads = {str(i): load for i, load in result.layers.items()} | {"all": result.overall}
    return [
        {
            "group_tokens": result.group_tokens,
            "setting": setting,
            "capacity_factor": result.capacity_factor,
            "capacity": result.capacity,
            "layer": layer,
            "routed_tokens": load.num_tokens,
            "drop_rate": load.drop_rate,
            "routed_imbalance": load.routed_imbalance,
            "kept_imbalance": load.kept_imbalance,
            "routed_imbalance_over_run": load.routed_imbalance_over_run,
            "kept_imbalance_over_run": load.kept_imbalance_over_run,
            "loss": result.loss,
            "loss_increase": result.loss - dropless_loss,
        }
        for layer, load in loads.items()
    ]


def print_paper_comparison(results: list[CapacityResult]) -> None:
    """Ours and the paper's, by capacity factor, both as loss over the loss at factor 2.0."""
    ours = {r.capacity_factor: r for r in results}
    paper = {row.capacity_factor: row for row in SWITCH_PAPER}
    rows = []
    for factor, row in paper.items():
        result = ours.get(factor)
        rows.append(
            {
                "capacity_factor": factor,
                "drop_rate": "-" if result is None else f"{result.overall.drop_rate:.4f}",
                "loss_vs_cf2": "-"
                if result is None or 2.0 not in ours
                else f"{result.loss - ours[2.0].loss:+.4f}",
                # Sec. 2.2 gives one figure for all runs, not one per capacity factor.
                "paper_drop_rate": "typ. <1%",
                "paper_loss_vs_cf2": f"{paper[2.0].neg_log_perplexity - row.neg_log_perplexity:+.3f}",
                "paper_hours_to_threshold": f"{row.hours_to_threshold:.1f}",
                "paper_examples_per_s": f"{row.examples_per_s:.0f}",
            }
        )
    print(
        "\nBeside the Switch Transformer paper (Fedus, Zoph, Shazeer; arXiv:2101.03961v3), "
        "Table 1, Switch-Base:"
    )
    print_table(rows, list(rows[0]))
    for note in SWITCH_PAPER_NOTES:
        print(f"- {note}")


def _print_rows(rows: list[dict], columns: list[str]) -> None:
    print_table([{c: "-" if r[c] is None else r[c] for c in columns} for r in rows], columns)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report_path = args.model_dir / "train_report.json"  # written by the trainer, if it was
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    train_config = report.get("config", {})
    per_group = args.group_tokens // args.seq_len
    windows = held_out_windows(
        args.model_dir,
        args.seq_len,
        args.max_windows,
        held_out_percent=train_config.get("held_out_percent", DEFAULT_HELD_OUT_PERCENT),
        max_corpus_files=train_config.get("max_corpus_files"),
    )
    windows = windows[: len(windows) // per_group * per_group]
    if len(windows) == 0:
        raise SystemExit(f"the held-out set has fewer than {per_group} windows of {args.seq_len}")
    print(
        f"{args.model_dir}: {len(windows)} held-out windows of {args.seq_len} tokens, "
        f"routed {args.group_tokens} tokens ({per_group} windows) per group"
    )
    if "capacity_factor" in train_config:
        print(
            f"trained at capacity factor {train_config['capacity_factor']}, "
            f"train drop rate {report['report']['train_drop_rate']:.4f}, "
            f"train imbalance {report['report']['train_imbalance']:.3f} (over the run)"
        )

    results = [
        measure(args.model_dir, windows, factor, args.group_tokens, args.dtype)
        for factor in [None, *args.capacity_factors]
    ]
    dropless_loss = results[0].loss
    rows = [row for result in results for row in result_rows(result, dropless_loss)]

    columns = ["setting", "capacity", "drop_rate", "routed_imbalance", "kept_imbalance"]
    print("\nAll MoE layers (imbalance: busiest expert / mean, per group, mean over groups):")
    _print_rows([r for r in rows if r["layer"] == "all"], [*columns, "loss", "loss_increase"])
    print("\nPer MoE layer (decoder layer index):")
    _print_rows([r for r in rows if r["layer"] != "all"], ["layer", *columns])
    print_paper_comparison(results)
    print(f"saved {write_table(rows, 'moe_capacity')}")


if __name__ == "__main__":
    main()
