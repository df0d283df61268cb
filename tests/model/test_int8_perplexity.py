"""LLM.int8() on the embedded model: held-out perplexity within 1% of fp32, weights in int8."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer

from raycake.assets import default_model_dir
from raycake.model.int8_linear import Int8Linear
from raycake.model.loader import load_model
from raycake.training.corpus import read_texts, split_corpus
from raycake.training.trainer import encode_corpus, evaluate

SEQ_LEN = 256
NUM_WINDOWS = 24  # 6,144 held-out tokens: enough for a 1% bound, seconds on a CPU


@pytest.fixture(scope="module")
def held_out_tokens():
    tokenizer = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    texts = list(read_texts(split_corpus().held_out))
    return encode_corpus(tokenizer, texts)


def test_int8_held_out_perplexity_is_within_one_percent_of_fp32(held_out_tokens, capsys):
    fp32 = load_model(default_model_dir())
    int8 = load_model(default_model_dir(), quantization="int8")
    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) == 4 * 4  # qkv, o, gate_up, down
    loss_fp32 = evaluate(fp32, held_out_tokens, SEQ_LEN, NUM_WINDOWS)
    loss_int8 = evaluate(int8, held_out_tokens, SEQ_LEN, NUM_WINDOWS)
    ratio = math.exp(loss_int8) / math.exp(loss_fp32)
    with capsys.disabled():
        print(
            f"\nheld-out perplexity over {NUM_WINDOWS * SEQ_LEN} tokens: fp32 "
            f"{math.exp(loss_fp32):.4f}, int8 {math.exp(loss_int8):.4f} (ratio {ratio:.5f})"
        )
    assert abs(ratio - 1) < 0.01


def test_int8_next_token_choice_matches_fp32_almost_everywhere(held_out_tokens):
    fp32 = load_model(default_model_dir())
    int8 = load_model(default_model_dir(), quantization="int8")
    ids = torch.from_numpy(held_out_tokens[: 4 * SEQ_LEN].astype("int64")).view(4, SEQ_LEN)
    positions = torch.arange(SEQ_LEN).expand(4, SEQ_LEN)
    with torch.no_grad():
        a = fp32.compute_logits(fp32(ids, positions)).argmax(-1)
        b = int8.compute_logits(int8(ids, positions)).argmax(-1)
    assert (a == b).float().mean().item() > 0.97
