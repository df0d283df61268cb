"""Train the embedded models: BPE on the stdlib, then a small Llama 3 (or its Switch-MoE or
Titans MAG variant) from scratch.

Writes a Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) plus ``train_report.json`` and ``loss_curve.png`` beside it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from raycake.model.config import (
    TITANS_ARCHITECTURE,
    ModelConfig,
    MoEConfig,
    NeuralMemoryConfig,
    TitansConfig,
)
from raycake.model.llama import LlamaDecoderLayer, LlamaForCausalLM
from raycake.model.loader import save_checkpoint
from raycake.model.moe import MoEStats
from raycake.model.titans_mag import TitansMAGForCausalLM, build_model
from raycake.training.bpe import BOS, EOS, save_tokenizer, train_bpe
from raycake.training.config import TrainConfig
from raycake.training.corpus import read_texts, split_corpus
from raycake.training.recall import RecallSample, RecallTask, teacher_forced_accuracy

# The recall evaluation's needle sits this many sliding windows back: beyond what a window
# reaches through the stacked layers of the default 4-layer model (4 x (window - 1) tokens).
RECALL_DISTANCE_WINDOWS = 4


@dataclass(frozen=True)
class TrainReport:
    num_parameters: int
    train_tokens: int
    held_out_tokens: int
    tokens_seen: int
    held_out_loss: float
    held_out_perplexity: float
    unigram_loss: float
    unigram_perplexity: float
    seconds: float
    # MoE models: parameters a token passes through (one expert per MoE layer).
    num_active_parameters: int = 0
    # MoE models, over the training run: (token, expert) pairs dropped at the training
    # capacity factor, and the busiest expert's load over the mean (1.0 = balanced).
    train_drop_rate: float = 0.0
    train_imbalance: float = 1.0
    # With recall_fraction > 0: held-out passkey trials answered exactly (teacher-forced), the
    # needle recall_distance filler tokens before the query.
    recall_accuracy: float | None = None
    recall_distance: int = 0


def encode_corpus(tokenizer, texts: list[str]) -> np.ndarray:
    """All texts as one token stream, each file followed by EOS."""
    eos = tokenizer.token_to_id(EOS)
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    pieces = []
    for enc in encodings:
        pieces.append(np.asarray(enc.ids, dtype=np.int32))
        pieces.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(pieces)


def unigram_cross_entropy(train: np.ndarray, held_out: np.ndarray, vocab_size: int) -> float:
    """Held-out cross-entropy (nats/token) of add-one-smoothed unigram frequencies of the train set."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[held_out].mean())


def titans_config_for(cfg: TrainConfig) -> TitansConfig:
    return TitansConfig(
        sliding_window=cfg.sliding_window,
        memory=NeuralMemoryConfig(
            hidden_size=cfg.hidden_size,
            num_heads=cfg.memory_heads,
            head_dim=cfg.memory_head_dim,
            depth=cfg.memory_depth,
            expansion=cfg.memory_expansion,
            chunk_size=cfg.memory_chunk_size,
            max_lr=cfg.memory_max_lr,
        ),
        num_persistent_tokens=cfg.num_persistent_tokens,
        memory_layers=cfg.memory_layers,
    )


def model_config_for(cfg: TrainConfig, tokenizer) -> ModelConfig:
    arch: dict = {}
    if cfg.arch == "titans-mag":
        arch = {"architecture": TITANS_ARCHITECTURE, "titans": titans_config_for(cfg)}
    elif cfg.num_experts:
        arch = {
            "architecture": "SwitchLlamaForCausalLM",
            "num_experts": cfg.num_experts,
            "num_experts_per_tok": 1,
            "decoder_sparse_step": cfg.decoder_sparse_step,
            "router_type": "switch",
        }
    return ModelConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_ids=(tokenizer.token_to_id(EOS),),
        **arch,
    )


def active_parameters(model: LlamaForCausalLM) -> int:
    """Parameters one token passes through: MoE layers count one expert (top-1), not all."""
    total = sum(p.numel() for p in model.parameters())
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = sum(p[0].numel() for p in experts.parameters())
            total -= (experts.num_experts - 1) * per_expert
    return total


def moe_losses(model: LlamaForCausalLM) -> list[torch.Tensor]:
    """The Switch load-balancing loss of each MoE layer's last forward."""
    return [
        layer.last_routing.aux_loss
        for layer in model.model.layers
        if isinstance(layer, LlamaDecoderLayer) and layer.last_routing is not None
    ]


def init_weights(model: LlamaForCausalLM, num_layers: int) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 x layers)."""
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            torch.nn.init.ones_(param)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(param)
        else:
            # experts.down_proj is the stacked [E, H, I] down projection of an MoE layer.
            std = (
                0.02 / math.sqrt(2 * num_layers)
                if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj"))
                else 0.02
            )
            torch.nn.init.normal_(param, std=std)
    # The memories' own starting points matter more than N(0, 0.02): their learned initial
    # memory M_0 (xavier) and the forgetting gate's bias (an untrained memory that forgets little).
    if isinstance(model, TitansMAGForCausalLM):
        for memory in model.memories().values():
            memory.reset_memory_parameters()


def _batch(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    data = torch.from_numpy(windows)
    return data[:, :-1], data[:, 1:]


def training_batch(
    cfg: TrainConfig,
    tokens: np.ndarray,
    rng: np.random.Generator,
    recall: RecallTask | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows of ``tokens``; with ``recall``, the first recall_rows of them
    replaced by passkey sequences cut from the same tokens."""
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, size=cfg.batch_size)
    windows = np.stack([tokens[s : s + cfg.seq_len + 1] for s in starts]).astype(np.int64)
    if recall is not None:
        for row in range(recall_rows(cfg)):
            windows[row] = recall.training_sequence(tokens, cfg.seq_len + 1, rng)
    data = torch.from_numpy(windows)
    return data[:, :-1], data[:, 1:]


def recall_rows(cfg: TrainConfig) -> int:
    """Recall sequences per batch: recall_fraction of it, rounded, at least one when asked for."""
    if cfg.recall_fraction == 0:
        return 0
    return max(1, round(cfg.recall_fraction * cfg.batch_size))


def recall_eval_set(
    cfg: TrainConfig, recall: RecallTask, held_tokens: np.ndarray
) -> list[RecallSample]:
    """Held-out passkey trials (fresh keys, their own seed), needle RECALL_DISTANCE_WINDOWS
    windows back; they must fit the trained context."""
    distance = RECALL_DISTANCE_WINDOWS * cfg.sliding_window
    needed = distance + recall.max_overhead()
    if needed > cfg.seq_len:
        raise ValueError(
            f"train.seq_len: expected >= {needed} so that the recall task (a needle "
            f"{RECALL_DISTANCE_WINDOWS} x sliding_window = {distance} tokens back) fits the "
            f"trained context, got {cfg.seq_len}"
        )
    return recall.eval_samples(held_tokens, cfg.eval_batches * 16, distance, seed=cfg.seed + 1)


def evaluate(model: LlamaForCausalLM, tokens: np.ndarray, seq_len: int, max_windows: int) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of ``tokens``."""
    num_windows = min(max_windows, (len(tokens) - 1) // seq_len)
    if num_windows == 0:
        raise ValueError(
            f"held-out set has {len(tokens)} tokens, fewer than one window of {seq_len}"
        )
    starts = np.arange(num_windows) * seq_len
    positions = torch.arange(seq_len)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, num_windows, 16):
            x, y = _batch(tokens, starts[i : i + 16], seq_len)
            logits = model.compute_logits(model(x, positions.expand_as(x)))
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    model.train()
    return total / count


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_learning_rate + (cfg.learning_rate - cfg.min_learning_rate) * cosine


def plot_losses(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history if "train_loss" in h]
    ax.plot(
        steps, [h["train_loss"] for h in history if "train_loss" in h], label="train", alpha=0.6
    )
    evals = [h for h in history if "held_out_loss" in h]
    ax.plot([h["step"] for h in evals], [h["held_out_loss"] for h in evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"raycake {title}: stdlib corpus")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(cfg: TrainConfig) -> TrainReport:
    """Run the whole pipeline and write the checkpoint folder ``cfg.out_dir``."""
    # torch's thread count is process-wide: restore it for whatever runs next in this process.
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> TrainReport:
    started = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    split = split_corpus(held_out_percent=cfg.held_out_percent)
    limit = cfg.max_corpus_files
    train_texts = list(read_texts(split.train[:limit]))
    held_texts = list(read_texts(split.held_out[:limit]))
    if cfg.tokenizer_dir is not None:
        tokenizer = Tokenizer.from_file(str(Path(cfg.tokenizer_dir) / "tokenizer.json"))
        if tokenizer.get_vocab_size() != cfg.vocab_size:
            raise ValueError(
                f"train.tokenizer_dir: {cfg.tokenizer_dir} has a vocabulary of "
                f"{tokenizer.get_vocab_size()}, expected train.vocab_size {cfg.vocab_size}"
            )
    else:
        tokenizer = train_bpe(train_texts, cfg.vocab_size)
    train_tokens = encode_corpus(tokenizer, train_texts)
    held_tokens = encode_corpus(tokenizer, held_texts)

    recall = RecallTask(tokenizer) if cfg.recall_fraction > 0 else None
    recall_samples = recall_eval_set(cfg, recall, held_tokens) if recall is not None else []

    model_config = model_config_for(cfg, tokenizer)
    # Training routes as the Switch paper trains: top-1 with tokens past capacity dropped.
    moe = MoEConfig(router="switch", capacity_factor=cfg.capacity_factor)
    model = build_model(model_config, moe if cfg.num_experts else None)
    init_weights(model, cfg.num_hidden_layers)
    num_parameters = sum(p.numel() for p in model.parameters())
    moe_stats = MoEStats(cfg.num_experts) if cfg.num_experts else None
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.learning_rate,
        betas=(0.9, 0.95),
    )
    positions = torch.arange(cfg.seq_len).expand(cfg.batch_size, cfg.seq_len)
    history: list[dict[str, float]] = []
    model.train()
    progress = tqdm(range(cfg.steps), desc="train", unit="step")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        x, y = training_batch(cfg, train_tokens, rng, recall)
        logits = model.compute_logits(model(x, positions))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if not torch.isfinite(loss):
            # Every later step would be NaN too: stop now rather than ship a broken model.
            raise FloatingPointError(f"train: loss is {loss.item()} at step {step}")
        objective = loss
        if moe_stats is not None:
            objective = loss + cfg.aux_loss_coef * torch.stack(moe_losses(model)).sum()
            for layer in model.model.layers:
                if layer.last_routing is not None:
                    moe_stats.update(layer.last_routing)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append({"step": step, "train_loss": loss.item()})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            held = evaluate(model, held_tokens, cfg.seq_len, cfg.eval_batches * 16)
            point = {"step": step, "held_out_loss": held}
            if recall_samples:
                point["recall_accuracy"] = teacher_forced_accuracy(model, recall_samples)
            point["seconds"] = time.perf_counter() - started
            history.append(point)
            progress.set_postfix(loss=f"{loss.item():.3f}", held_out=f"{held:.3f}")

    save_checkpoint(model, out_dir, dtype=cfg.save_dtype)
    save_tokenizer(tokenizer, out_dir)
    # Report on the weights as shipped (after the cast to save_dtype), over the whole held-out set.
    from raycake.model.loader import load_model

    shipped = load_model(out_dir, dtype="float32")
    held_out_loss = evaluate(shipped, held_tokens, cfg.seq_len, max_windows=1 << 30)
    unigram = unigram_cross_entropy(train_tokens, held_tokens, cfg.vocab_size)
    recall_accuracy = teacher_forced_accuracy(shipped, recall_samples) if recall_samples else None
    report = TrainReport(
        num_parameters=num_parameters,
        train_tokens=len(train_tokens),
        held_out_tokens=len(held_tokens),
        tokens_seen=cfg.steps * cfg.batch_size * cfg.seq_len,
        held_out_loss=held_out_loss,
        held_out_perplexity=math.exp(held_out_loss),
        unigram_loss=unigram,
        unigram_perplexity=math.exp(unigram),
        seconds=time.perf_counter() - started,
        num_active_parameters=active_parameters(model),
        train_drop_rate=moe_stats.drop_rate if moe_stats else 0.0,
        train_imbalance=moe_stats.imbalance if moe_stats else 1.0,
        recall_accuracy=recall_accuracy,
        recall_distance=RECALL_DISTANCE_WINDOWS * cfg.sliding_window if recall_samples else 0,
    )
    (out_dir / "train_report.json").write_text(
        json.dumps({"config": asdict(cfg), "report": asdict(report), "history": history}, indent=1)
        + "\n"
    )
    plot_losses(history, out_dir / "loss_curve.png", model_title(cfg))
    return report


def model_title(cfg: TrainConfig) -> str:
    if cfg.arch == "titans-mag":
        return f"Titans MAG model (window {cfg.sliding_window})"
    if cfg.num_experts:
        return f"Switch-MoE model ({cfg.num_experts} experts)"
    return "default model"
