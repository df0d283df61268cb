"""Train an EAGLE-1 draft head for a frozen target on a text corpus (``raycake train-eagle``).

Legend: B windows, S tokens per window, E hidden size, V vocabulary.

For a window x[0..S] the target computes features f[t] (its final hidden states) for t < S. The
head's entry t reads (f[t] + uniform noise, x[t+1], position t+1) and predicts f[t+1]. The loss is
the EAGLE paper's: smooth-L1 to f[t+1] plus 0.1 x the cross-entropy from the target's next-token
distribution Softmax(LM_Head(f[t+1])) to the head's Softmax(LM_Head(prediction)) (or, with
``token_target="text"``, to the corpus token x[t+2]). With a draft vocabulary (the default) the
cross-entropy to the target is over those tokens only, as in EAGLE-3: the head drafts nothing
else, and both logits then cost a quarter of the full lm_head. Features come from the frozen
target on every batch, or once for a pool of windows (``cache_windows``). Writes the head
(``save_eagle_head``) plus ``train_report.json`` and ``loss_curve.png``. The report's
``held_out_accuracy`` is how often the head's draft (its top-1 token, from the draft
vocabulary when it has one) equals the target's greedy token on held-out text, with the true
features as input: the chance the first draft token is accepted.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from raycake.model.eagle import DraftLayerShape, EagleDraftHead, save_eagle_head
from raycake.model.llama import LlamaForCausalLM
from raycake.model.loader import load_model, resolve_model_path
from raycake.training.bpe import EOS
from raycake.training.config import EagleTrainConfig
from raycake.training.corpus import read_texts, split_corpus
from raycake.training.trainer import encode_corpus, init_weights, learning_rate


@dataclass(frozen=True)
class EagleTrainReport:
    num_parameters: int
    weight_bytes: int
    train_tokens: int
    held_out_tokens: int
    tokens_seen: int
    # Held-out, on the weights as saved: smooth-L1 to the target's features, the training
    # cross-entropy (to the target's distribution, over the draft vocabulary when there is
    # one), and how often the head's draft is the target's greedy token (the per-token
    # acceptance proxy).
    held_out_feature_loss: float
    held_out_token_ce: float
    held_out_accuracy: float
    # Baselines on the same positions: always drafting the target's most frequent greedy token,
    # and the untrained head.
    majority_accuracy: float
    untrained_accuracy: float
    # How often the target's greedy token is the text's next token (the target's own accuracy).
    target_text_accuracy: float
    seconds: float
    # Draft vocabulary size (None: all tokens) and the share of held-out tokens it contains.
    draft_vocab_size: int | None = None
    draft_vocab_coverage: float = 1.0


@dataclass(frozen=True)
class HeldOutMetrics:
    feature_loss: float
    token_ce: float
    accuracy: float
    majority_accuracy: float
    target_text_accuracy: float


def _tokens(cfg: EagleTrainConfig, target_dir: Path, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out token streams of the corpus, in the target's tokenizer."""
    tokenizer = Tokenizer.from_file(str(target_dir / "tokenizer.json"))
    split = split_corpus(
        None if cfg.corpus_root is None else Path(cfg.corpus_root), cfg.held_out_percent
    )
    limit = cfg.max_corpus_files
    streams = []
    for files in (split.train[:limit], split.held_out[:limit]):
        texts = list(read_texts(files))
        if tokenizer.token_to_id(EOS) is not None:
            streams.append(encode_corpus(tokenizer, texts))
        else:  # a tokenizer not trained by raycake: separate files with the model's EOS id
            encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
            ids = [i for enc in encodings for i in (*enc.ids, eos_id)]
            streams.append(np.asarray(ids, dtype=np.int32))
    train, held = streams
    if len(held) < cfg.seq_len + 1:
        raise ValueError(
            f"train_eagle.seq_len: the held-out set has {len(held)} tokens, fewer than one "
            f"window of {cfg.seq_len} + 1; use more corpus files or a shorter seq_len"
        )
    return train, held


def most_frequent_tokens(tokens: np.ndarray, size: int, vocab_size: int) -> list[int] | None:
    """The ``size`` most frequent ids in ``tokens`` (ties: the lower id), for the head's draft
    vocabulary; None when that is the whole vocabulary."""
    if size >= vocab_size:
        return None
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)
    order = np.lexsort((np.arange(vocab_size), -counts))  # by count down, then id up
    return sorted(int(i) for i in order[:size])


def draft_vocab_coverage(tokens: np.ndarray, draft_vocab: list[int] | None) -> float:
    """Share of ``tokens`` that are in the draft vocabulary (1.0 without one)."""
    if draft_vocab is None:
        return 1.0
    return float(np.isin(tokens, np.asarray(draft_vocab)).mean())


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """[B, S + 1] token windows starting at ``starts``."""
    return torch.from_numpy(
        np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    )


@torch.no_grad()
def target_features(target: LlamaForCausalLM, windows: torch.Tensor) -> torch.Tensor:
    """windows [B, S + 1] -> the target's final hidden states at positions 0..S-1 [B, S, E]."""
    inputs = windows[:, :-1]  # [B, S]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    return target(inputs, positions)


def head_outputs(
    head: EagleDraftHead,
    target: LlamaForCausalLM,
    windows: torch.Tensor,
    features: torch.Tensor,
    noise: float = 0.0,
) -> torch.Tensor:
    """windows [B, S + 1], features [B, S, E] -> predicted features of positions 1..S-1 [B, S-1, E]."""
    inputs = features[:, :-1]  # [B, S-1, E]: f[t] for t = 0..S-2
    if noise > 0:
        inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * noise
    next_tokens = windows[:, 1:-1]  # [B, S-1]: x[t+1]
    positions = torch.arange(1, next_tokens.shape[1] + 1).expand_as(next_tokens)
    return head(inputs, next_tokens, positions, target.model.embed_tokens)


def eagle_losses(
    target: LlamaForCausalLM,
    windows: torch.Tensor,
    features: torch.Tensor,
    predicted: torch.Tensor,
    token_target: str = "target",
    draft_vocab: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(smooth-L1 to f[t+1], CE of the drafted distribution, drafted tokens [B, S-1]).

    ``token_target="target"``: CE against the target's distribution at t+1 (the paper's
    CrossEntropy(p_{i+2}, p^_{i+2})); with ``draft_vocab`` (ids [Vd]) both distributions are
    over those tokens (the target's renormalized over them), and drafts come from them.
    ``"text"``: against the corpus token x[t+2], over the whole vocabulary.
    """
    feature_loss = F.smooth_l1_loss(predicted, features[:, 1:])
    if token_target == "target":
        rows = target.lm_head.weight
        if draft_vocab is not None:
            rows = rows[draft_vocab]  # [Vd, E]
        logits = F.linear(predicted, rows).float()  # [B, S-1, Vd]
        with torch.no_grad():
            target_probs = F.linear(features[:, 1:], rows).float().softmax(-1)  # [B, S-1, Vd]
        token_ce = -(target_probs * logits.log_softmax(-1)).sum(-1).mean()
        drafted = logits.argmax(-1)
        if draft_vocab is not None:
            drafted = draft_vocab[drafted]
    else:
        logits = target.compute_logits(predicted)  # [B, S-1, V]
        token_ce = F.cross_entropy(logits.flatten(0, 1), windows[:, 2:].flatten())
        drafted = logits.argmax(-1)
    return feature_loss, token_ce, drafted


@torch.no_grad()
def evaluate_head(
    head: EagleDraftHead,
    target: LlamaForCausalLM,
    tokens: np.ndarray,
    seq_len: int,
    max_windows: int,
    token_target: str = "target",
    draft_vocab: torch.Tensor | None = None,
) -> HeldOutMetrics:
    """Held-out metrics over consecutive non-overlapping windows of ``tokens``."""
    num_windows = min(max_windows, (len(tokens) - 1) // seq_len)
    starts = np.arange(num_windows) * seq_len
    was_training = head.training
    head.eval()
    sums = dict(feature=0.0, ce=0.0, agree=0, text=0, count=0)
    greedy_counts: dict[int, int] = {}
    for i in range(0, num_windows, 16):
        windows = _windows(tokens, starts[i : i + 16], seq_len)
        features = target_features(target, windows)  # [B, S, E]
        predicted = head_outputs(head, target, windows, features)
        feature_loss, token_ce, drafted = eagle_losses(
            target, windows, features, predicted, token_target, draft_vocab
        )
        greedy = target.compute_logits(features[:, 1:]).argmax(-1)  # [B, S-1]: target's x[t+2]
        n = greedy.numel()
        sums["feature"] += feature_loss.item() * n
        sums["ce"] += token_ce.item() * n
        sums["agree"] += (drafted == greedy).sum().item()
        sums["text"] += (greedy == windows[:, 2:]).sum().item()
        sums["count"] += n
        for token, count in zip(*np.unique(greedy.numpy(), return_counts=True), strict=True):
            greedy_counts[int(token)] = greedy_counts.get(int(token), 0) + int(count)
    head.train(was_training)
    count = sums["count"]
    return HeldOutMetrics(
        feature_loss=sums["feature"] / count,
        token_ce=sums["ce"] / count,
        accuracy=sums["agree"] / count,
        majority_accuracy=max(greedy_counts.values()) / count,
        target_text_accuracy=sums["text"] / count,
    )


class _CachedFeatures:
    """The target's features of a fixed pool of training windows, computed once."""

    def __init__(self, target: LlamaForCausalLM, windows: torch.Tensor) -> None:
        self.windows = windows  # [N, S + 1]
        chunks = [
            target_features(target, windows[i : i + 16])
            for i in tqdm(range(0, len(windows), 16), desc="features", unit="batch")
        ]
        self.features = torch.cat(chunks)  # [N, S, E]


def plot_eagle_curves(
    history: list[dict[str, float]], path: Path, title: str, majority_accuracy: float | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    train = [h for h in history if "train_loss" in h]
    evals = [h for h in history if "held_out_loss" in h]
    loss_ax.plot(
        [h["step"] for h in train], [h["train_loss"] for h in train], label="train", alpha=0.6
    )
    loss_ax.plot(
        [h["step"] for h in evals], [h["held_out_loss"] for h in evals], "o-", label="held-out"
    )
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("smooth-L1 + 0.1 x cross-entropy")
    loss_ax.set_title(f"raycake {title}: loss")
    acc_ax.plot(
        [h["step"] for h in evals], [h["held_out_accuracy"] for h in evals], "o-", label="head"
    )
    if majority_accuracy is not None:
        acc_ax.axhline(majority_accuracy, ls="--", color="gray", label="most frequent token")
    acc_ax.set_xlabel("step")
    acc_ax.set_ylabel("top-1 = target's greedy token")
    acc_ax.set_title("held-out draft accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_eagle(cfg: EagleTrainConfig) -> EagleTrainReport:
    """Train the head and write ``cfg.out_dir``."""
    started = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    target_dir = resolve_model_path(cfg.target)
    target = load_model(target_dir, dtype="float32")
    target.requires_grad_(False)
    train_tokens, held_tokens = _tokens(cfg, target_dir, target.config.eos_token_ids[0])
    if len(train_tokens) < cfg.seq_len + 2:
        raise ValueError(
            f"train_eagle.seq_len: the training set has {len(train_tokens)} tokens, fewer than "
            f"one window of {cfg.seq_len} + 1"
        )

    draft_layer = None
    if cfg.head_hidden_size is not None:
        try:
            draft_layer = DraftLayerShape.narrow(target.config, cfg.head_hidden_size)
        except ValueError as exc:
            raise ValueError(f"train_eagle.head_hidden_size: {exc}") from None
    head = EagleDraftHead(target.config, draft_layer)
    init_weights(head, num_layers=1)
    num_parameters = sum(p.numel() for p in head.parameters())
    draft_vocab = (
        None
        if cfg.draft_vocab_size is None
        else most_frequent_tokens(train_tokens, cfg.draft_vocab_size, target.config.vocab_size)
    )
    vocab_ids = None if draft_vocab is None else torch.tensor(draft_vocab, dtype=torch.long)
    untrained = evaluate_head(
        head, target, held_tokens, cfg.seq_len, cfg.eval_windows, cfg.token_target, vocab_ids
    )
    cache = None
    if cfg.cache_windows:
        starts = rng.integers(0, len(train_tokens) - cfg.seq_len - 1, size=cfg.cache_windows)
        cache = _CachedFeatures(target, _windows(train_tokens, starts, cfg.seq_len))

    decay = [p for p in head.parameters() if p.dim() >= 2]
    no_decay = [p for p in head.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.learning_rate,
        betas=(0.9, 0.95),
    )
    history: list[dict[str, float]] = [
        {
            "step": 0,
            "held_out_loss": untrained.feature_loss * cfg.feature_loss_weight
            + untrained.token_ce * cfg.token_loss_weight,
            "held_out_feature_loss": untrained.feature_loss,
            "held_out_token_ce": untrained.token_ce,
            "held_out_accuracy": untrained.accuracy,
        }
    ]
    head.train()
    progress = tqdm(range(cfg.steps), desc="train-eagle", unit="step")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        if cache is None:
            starts = rng.integers(0, len(train_tokens) - cfg.seq_len - 1, size=cfg.batch_size)
            windows = _windows(train_tokens, starts, cfg.seq_len)  # [B, S + 1]
            features = target_features(target, windows)  # [B, S, E]
        else:
            picks = torch.from_numpy(rng.integers(0, len(cache.windows), size=cfg.batch_size))
            windows, features = cache.windows[picks], cache.features[picks]
        predicted = head_outputs(head, target, windows, features, cfg.feature_noise)
        feature_loss, token_ce, _ = eagle_losses(
            target, windows, features, predicted, cfg.token_target, vocab_ids
        )
        loss = cfg.feature_loss_weight * feature_loss + cfg.token_loss_weight * token_ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        history.append(
            {
                "step": step + 1,
                "train_loss": loss.item(),
                "train_feature_loss": feature_loss.item(),
                "train_token_ce": token_ce.item(),
            }
        )
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            held = evaluate_head(
                head,
                target,
                held_tokens,
                cfg.seq_len,
                cfg.eval_windows,
                cfg.token_target,
                vocab_ids,
            )
            history.append(
                {
                    "step": step + 1,
                    "held_out_loss": held.feature_loss * cfg.feature_loss_weight
                    + held.token_ce * cfg.token_loss_weight,
                    "held_out_feature_loss": held.feature_loss,
                    "held_out_token_ce": held.token_ce,
                    "held_out_accuracy": held.accuracy,
                }
            )
            progress.set_postfix(loss=f"{loss.item():.3f}", held_out_acc=f"{held.accuracy:.3f}")

    head.set_draft_vocab(draft_vocab)
    save_eagle_head(head, out_dir, dtype=cfg.save_dtype)
    # Report on the weights as shipped (after the cast to save_dtype).
    from raycake.model.eagle import load_eagle_head

    shipped = load_eagle_head(out_dir, target.config, dtype="float32")
    # The final numbers average 16x more held-out windows than the periodic evaluations.
    final = evaluate_head(
        shipped,
        target,
        held_tokens,
        cfg.seq_len,
        16 * cfg.eval_windows,
        cfg.token_target,
        vocab_ids,
    )
    report = EagleTrainReport(
        num_parameters=num_parameters,
        weight_bytes=(out_dir / "model.safetensors").stat().st_size,
        train_tokens=len(train_tokens),
        held_out_tokens=len(held_tokens),
        tokens_seen=cfg.steps * cfg.batch_size * cfg.seq_len,
        held_out_feature_loss=final.feature_loss,
        held_out_token_ce=final.token_ce,
        held_out_accuracy=final.accuracy,
        majority_accuracy=final.majority_accuracy,
        untrained_accuracy=untrained.accuracy,
        target_text_accuracy=final.target_text_accuracy,
        seconds=time.perf_counter() - started,
        draft_vocab_size=None if draft_vocab is None else len(draft_vocab),
        draft_vocab_coverage=draft_vocab_coverage(held_tokens, draft_vocab),
    )
    (out_dir / "train_report.json").write_text(
        json.dumps({"config": asdict(cfg), "report": asdict(report), "history": history}, indent=1)
        + "\n"
    )
    plot_eagle_curves(
        history,
        out_dir / "loss_curve.png",
        f"EAGLE head for {cfg.target!r}",
        final.majority_accuracy,
    )
    return report


def accuracy_line(report: EagleTrainReport) -> str:
    """One line for the command line."""
    return (
        f"parameters {report.num_parameters:,} ({report.weight_bytes / 2**20:.1f} MiB); "
        f"held-out top-1 = target greedy {report.held_out_accuracy:.1%} (untrained "
        f"{report.untrained_accuracy:.1%}, majority {report.majority_accuracy:.1%}); feature "
        f"loss {report.held_out_feature_loss:.4f}, token CE {report.held_out_token_ce:.3f}; "
        + (
            ""
            if report.draft_vocab_size is None
            else f"draft vocabulary {report.draft_vocab_size} tokens "
            f"({report.draft_vocab_coverage:.1%} of held-out tokens); "
        )
        + f"{report.seconds:.0f} s"
    )
