"""``raycake train`` and ``raycake train-eagle``: what each trains, on what, for how long."""

from __future__ import annotations

from dataclasses import dataclass

from raycake.model.config import SUPPORTED_DTYPES
from raycake.validation import (
    check_choice,
    check_count,
    check_int,
    check_number,
    check_positive_int,
    is_int,
    require,
)

# ``raycake train --arch``: a dense (or Switch-MoE) Llama, or Titans MAG on the same decoder.
TRAIN_ARCHS = ("llama", "titans-mag")


@dataclass(frozen=True)
class TrainConfig:
    """``raycake train``: the embedded default model, trained from scratch on the stdlib corpus."""

    out_dir: str
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 3000
    learning_rate: float = 2e-3
    min_learning_rate: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_batches: int = 16
    held_out_percent: int = 2
    # None: the whole stdlib. A small number makes a quick smoke run of the pipeline.
    max_corpus_files: int | None = None
    save_dtype: str = "float32"
    # A folder whose tokenizer.json to reuse instead of training BPE (so that two models
    # are compared on the same tokens); None: train one.
    tokenizer_dir: str | None = None
    # > 0: a Switch-MoE model (SwitchLlamaForCausalLM): top-1 routing over num_experts experts
    # in every decoder_sparse_step-th layer, trained with the paper's capacity factor and
    # load-balancing loss (alpha = 1e-2).
    num_experts: int = 0
    decoder_sparse_step: int = 2
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01
    arch: str = "llama"
    # titans-mag only: each layer attends over the last sliding_window tokens plus
    # num_persistent_tokens learned K/V; the layers in memory_layers (empty: all) gate that with a
    # neural memory of memory_heads x memory_head_dim, a memory_depth-layer MLP of width
    # memory_expansion x memory_head_dim, updated every memory_chunk_size tokens. The serving
    # engine's KV block size (16 by default) must divide memory_chunk_size.
    sliding_window: int = 32
    num_persistent_tokens: int = 4
    memory_layers: tuple[int, ...] = ()
    memory_heads: int = 2
    memory_head_dim: int = 64
    memory_depth: int = 2
    memory_expansion: int = 2
    memory_chunk_size: int = 16
    # The memory's per-token learning rate theta is memory_max_lr x sigmoid(.): the cap bounds
    # how far one chunk's update can move the memory (the model learns the rest of the gate).
    memory_max_lr: float = 1.0
    # This fraction of each batch's sequences (rounded) is a synthetic passkey-recall sequence
    # (raycake.training.recall) built from train files, so that a windowed model learns to use
    # its memory for what the window cannot see; 0: plain corpus windows only.
    recall_fraction: float = 0.0
    # torch intra-op threads for the run; None: torch's default (one per core). On a machine
    # shared with other jobs, 1 avoids the stalls of more threads than free cores.
    num_threads: int | None = None

    def __post_init__(self) -> None:
        check_choice("train.arch", self.arch, TRAIN_ARCHS)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "seq_len",
            "batch_size",
            "steps",
            "eval_every",
            "eval_batches",
        ):
            check_positive_int(f"train.{name}", getattr(self, name))
        require(
            self.vocab_size >= 259,
            "train.vocab_size",
            ">= 259 (256 bytes + specials)",
            self.vocab_size,
        )
        require(
            self.hidden_size % self.num_attention_heads == 0,
            "train.hidden_size",
            f"a multiple of num_attention_heads ({self.num_attention_heads})",
            self.hidden_size,
        )
        require(self.learning_rate > 0, "train.learning_rate", "> 0", self.learning_rate)
        if self.max_corpus_files is not None:
            check_positive_int("train.max_corpus_files", self.max_corpus_files)
        if self.num_threads is not None:
            check_positive_int("train.num_threads", self.num_threads)
        require(
            self.save_dtype in SUPPORTED_DTYPES,
            "train.save_dtype",
            str(SUPPORTED_DTYPES),
            self.save_dtype,
        )
        require(
            isinstance(self.num_experts, int) and self.num_experts >= 0,
            "train.num_experts",
            "an integer >= 0 (0: dense)",
            self.num_experts,
        )
        if self.num_experts:
            require(
                self.num_experts >= 2,
                "train.num_experts",
                ">= 2 (one expert is a dense layer)",
                self.num_experts,
            )
            check_positive_int("train.decoder_sparse_step", self.decoder_sparse_step)
            require(
                self.capacity_factor > 0,
                "train.capacity_factor",
                "> 0",
                self.capacity_factor,
            )
            require(self.aux_loss_coef >= 0, "train.aux_loss_coef", ">= 0", self.aux_loss_coef)
        self._check_titans()

    def _check_titans(self) -> None:
        """The titans-mag knobs; checked whatever the arch, so a bad flag never passes silently."""
        for name in (
            "sliding_window",
            "memory_heads",
            "memory_head_dim",
            "memory_expansion",
            "memory_chunk_size",
        ):
            check_positive_int(f"train.{name}", getattr(self, name))
        check_int("train.memory_depth", self.memory_depth, low=2)
        check_number(
            "train.memory_max_lr", self.memory_max_lr, low=0.0, low_exclusive=True, high=1.0
        )
        check_count("train.num_persistent_tokens", self.num_persistent_tokens)
        require(
            isinstance(self.memory_layers, tuple)
            and all(is_int(i) and 0 <= i < self.num_hidden_layers for i in self.memory_layers),
            "train.memory_layers",
            f"a tuple of layer indices in [0, {self.num_hidden_layers}) (empty: every layer)",
            self.memory_layers,
        )
        check_number("train.recall_fraction", self.recall_fraction, low=0.0, high=0.5)
        if self.arch == "titans-mag":
            require(
                self.num_experts == 0,
                "train.num_experts",
                "0 for arch 'titans-mag' (its decoder is dense)",
                self.num_experts,
            )


@dataclass(frozen=True)
class EagleTrainConfig:
    """``raycake train-eagle``: an EAGLE-1 draft head for a frozen target, on a text corpus."""

    out_dir: str
    # An embedded model name ("default") or a checkpoint folder with tokenizer.json.
    target: str = "default"
    # A folder of .py files split like the stdlib; None: the stdlib (the embedded model's corpus).
    corpus_root: str | None = None
    seed: int = 0
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 2000
    learning_rate: float = 3e-3
    min_learning_rate: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    # The EAGLE paper's loss: feature_loss_weight x smooth-L1 + token_loss_weight x CE.
    feature_loss_weight: float = 1.0
    token_loss_weight: float = 0.1
    # What the CE is against: "target", the target's own next-token distribution (the paper's
    # CrossEntropy(p_{i+2}, p^_{i+2}) with p_{i+2} = Softmax(LM_Head(f_{i+1}))); "text", the
    # corpus token x[t+2].
    token_target: str = "target"
    # Half-width of the uniform noise added to the input features (absolute; 0: none).
    feature_noise: float = 0.1
    # > 0: compute the target's features for this many training windows once and train on them
    # (epochs); 0: run the target on every batch (fresh windows each step).
    cache_windows: int = 0
    eval_every: int = 200
    eval_windows: int = 64
    held_out_percent: int = 2
    max_corpus_files: int | None = None
    save_dtype: str = "float32"
    # Drafts come from this many most frequent training tokens (EAGLE-3's reduced draft
    # vocabulary); None: the whole vocabulary.
    draft_vocab_size: int | None = 1024
    # The draft layer's width (a narrow head: the target's head_dim, heads and MLP ratio scaled
    # to it, projected back to the target's hidden size); None: the target's width (EAGLE-1).
    head_hidden_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "steps", "eval_every", "eval_windows"):
            check_positive_int(f"train_eagle.{name}", getattr(self, name))
        require(self.seq_len >= 3, "train_eagle.seq_len", ">= 3", self.seq_len)
        require(self.learning_rate > 0, "train_eagle.learning_rate", "> 0", self.learning_rate)
        for name in (
            "min_learning_rate",
            "weight_decay",
            "feature_loss_weight",
            "token_loss_weight",
            "feature_noise",
        ):
            require(getattr(self, name) >= 0, f"train_eagle.{name}", ">= 0", getattr(self, name))
        require(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            "train_eagle.warmup_steps",
            "an integer >= 0",
            self.warmup_steps,
        )
        require(
            self.token_target in ("target", "text"),
            "train_eagle.token_target",
            "'target' or 'text'",
            self.token_target,
        )
        require(
            isinstance(self.cache_windows, int) and self.cache_windows >= 0,
            "train_eagle.cache_windows",
            "an integer >= 0 (0: no cache)",
            self.cache_windows,
        )
        if self.max_corpus_files is not None:
            check_positive_int("train_eagle.max_corpus_files", self.max_corpus_files)
        if self.draft_vocab_size is not None:
            check_positive_int("train_eagle.draft_vocab_size", self.draft_vocab_size)
        if self.head_hidden_size is not None:
            check_positive_int("train_eagle.head_hidden_size", self.head_hidden_size)
        require(
            self.save_dtype in SUPPORTED_DTYPES,
            "train_eagle.save_dtype",
            str(SUPPORTED_DTYPES),
            self.save_dtype,
        )
