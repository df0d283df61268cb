"""Tokenizer, chat templates, streaming detokenization and stop strings, checked against
transformers and against whole-text decoding."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from raycake.model.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from raycake.training.bpe import BOS, EOS, PAD, save_tokenizer, train_bpe

_TRAINING_TEXT = [
    "héllo wörld ✓ 日本語",
    "the quick brown fox jumps over the lazy dog",
    "def add(a, b):\n    return a + b\n",
    "naïve café 😀 — ünïcödé",
]
# Few merges: multi-byte characters are often split across tokens.
_VOCAB_SIZE = 300
_CHAR_POOL = "abc xyz\né ö ✓ 日 本 語 😀"

# Meta-Llama-3-8B-Instruct's chat template, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Multi-line, Llama 3.1 style: depends on trim_blocks / lstrip_blocks, tojson and raise_exception.
MULTILINE_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
<|start_header_id|>system<|end_header_id|>

{{ system_message }}
{{ {"turns": messages | length, "mark": "✓"} | tojson }}<|eot_id|>
{% for message in messages %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('roles must be user or assistant, got ' + message['role']) }}
    {% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
"""

MESSAGES = [
    {"role": "system", "content": "You are terse. ✓"},
    {"role": "user", "content": "  héllo 日本語 "},
    {"role": "assistant", "content": "wörld"},
    {"role": "user", "content": "again"},
]


def write_tokenizer(
    out_dir: Path,
    config_updates: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
    bos_post_processor: bool = True,
) -> Path:
    """A tiny byte-level BPE checkpoint tokenizer folder, as raycake's trainer saves it."""
    tokenizer = train_bpe(_TRAINING_TEXT * 4, _VOCAB_SIZE)
    if not bos_post_processor:
        tokenizer.post_processor = None
    save_tokenizer(tokenizer, out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(config_updates or {})
    config_path.write_text(json.dumps(config))
    if generation_config is not None:
        (out_dir / "generation_config.json").write_text(json.dumps(generation_config))
    return out_dir


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer(
        tmp_path_factory.mktemp("tokenizer"),
        {"chat_template": LLAMA3_TEMPLATE},
        generation_config={"eos_token_id": [1, 2]},
    )


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def random_text(rng: random.Random, max_chars: int = 24) -> str:
    return "".join(rng.choice(_CHAR_POOL) for _ in range(rng.randint(1, max_chars)))


# --- Tokenizer ---------------------------------------------------------------------------------


def test_special_tokens_and_vocab(tokenizer):
    assert tokenizer.vocab_size == _VOCAB_SIZE
    assert tokenizer.bos_token_id == 0
    # tokenizer_config's eos (<|end_of_text|>, id 1), then generation_config's, without repeats.
    assert tokenizer.eos_token_ids == (1, 2)


@pytest.mark.parametrize(
    "text",
    ["héllo wörld ✓ 日本語", "", "  leading spaces\n\ttabs", "😀😀 unseen: ñ Ω", f"mid {EOS} text"],
)
def test_encode_decode_match_transformers(tokenizer, tokenizer_dir, text):
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # exactly one BOS, added by the post-processor
    assert tokenizer.encode(text, add_special_tokens=False) == hf.encode(
        text, add_special_tokens=False
    )
    for skip in (True, False):
        assert tokenizer.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tokenizer.decode(ids) == text.replace(EOS, "")


def test_text_starting_with_bos_gets_no_second_bos(tokenizer):
    ids = tokenizer.encode(f"{BOS}hi")
    assert ids == [tokenizer.bos_token_id, *tokenizer.encode("hi", add_special_tokens=False)]


def test_add_bos_token_without_post_processor(tmp_path):
    tokenizer = Tokenizer.from_dir(write_tokenizer(tmp_path, bos_post_processor=False))
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    assert tokenizer.encode(f"{BOS}hi").count(tokenizer.bos_token_id) == 1
    assert tokenizer.bos_token_id not in tokenizer.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize("eos_token_id, expected", [(2, (1, 2)), (1, (1,)), ([2, 1, 2], (1, 2))])
def test_generation_config_eos(tmp_path, eos_token_id, expected):
    folder = write_tokenizer(tmp_path, generation_config={"eos_token_id": eos_token_id})
    assert Tokenizer.from_dir(folder).eos_token_ids == expected


def test_added_token_dicts_in_config(tmp_path):
    """tokenizer_config.json may spell special tokens as AddedToken dicts."""
    config = {"bos_token": {"content": BOS, "special": True}, "eos_token": {"content": PAD}}
    tokenizer = Tokenizer.from_dir(write_tokenizer(tmp_path, config))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids) == (0, (2,))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json not found"),
        (lambda d: (d / "tokenizer.json").write_text("{oops"), "not a valid tokenizers file"),
        (lambda d: (d / "tokenizer_config.json").write_text("[1"), "not valid JSON"),
        (lambda d: (d / "generation_config.json").write_text('{"eos_token_id": "x"}'), "eos"),
        (lambda d: (d / "tokenizer_config.json").write_text('{"eos_token": "<none>"}'), "<none>"),
    ],
    ids=["missing", "invalid-tokenizer", "invalid-config", "bad-generation-eos", "unknown-eos"],
)
def test_broken_tokenizer_folder_is_named(tmp_path, breakage, message):
    folder = write_tokenizer(tmp_path)
    breakage(folder)
    with pytest.raises(ValueError, match=message) as info:
        Tokenizer.from_dir(folder)
    assert str(folder) in str(info.value)


# --- chat templates ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template", [LLAMA3_TEMPLATE, MULTILINE_TEMPLATE], ids=["llama3", "multiline"]
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tmp_path, template, add_generation_prompt):
    folder = write_tokenizer(tmp_path, {"chat_template": template})
    hf = AutoTokenizer.from_pretrained(str(folder))
    expected = hf.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    rendered = Tokenizer.from_dir(folder).apply_chat_template(MESSAGES, add_generation_prompt)
    assert rendered == expected
    assert rendered.startswith(BOS)


def test_chat_template_list_picks_default(tmp_path):
    templates = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ messages[0]['content'] }}"},
    ]
    tokenizer = Tokenizer.from_dir(write_tokenizer(tmp_path, {"chat_template": templates}))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"


def test_chat_template_jinja_file_wins(tmp_path):
    folder = write_tokenizer(tmp_path, {"chat_template": "from config"})
    (folder / "chat_template.jinja").write_text("from file")
    assert Tokenizer.from_dir(folder).apply_chat_template(MESSAGES) == "from file"


def test_missing_chat_template_is_a_clear_error(tmp_path):
    folder = write_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(folder).apply_chat_template(MESSAGES)


def test_template_raise_exception_becomes_value_error(tmp_path):
    tokenizer = Tokenizer.from_dir(write_tokenizer(tmp_path, {"chat_template": MULTILINE_TEMPLATE}))
    with pytest.raises(ValueError, match="roles must be user or assistant, got tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}])


def test_template_sandbox_blocks_mutation(tmp_path):
    template = "{% set _ = messages.append({'role': 'x', 'content': 'y'}) %}{{ messages | length }}"
    tokenizer = Tokenizer.from_dir(write_tokenizer(tmp_path, {"chat_template": template}))
    with pytest.raises(ValueError, match="chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages",
    [[], "hi", ["hi"], [{"role": "user"}], [{"role": 1, "content": "x"}], [{"content": "x"}]],
)
def test_invalid_messages(tokenizer, messages):
    with pytest.raises(ValueError, match="messages"):
        tokenizer.apply_chat_template(messages)


# --- IncrementalDetokenizer --------------------------------------------------------------------


def _stream(
    tokenizer: Tokenizer, prompt_ids: list[int], output_ids: list[int], rng: random.Random
) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed ``output_ids`` in random chunks of 1-3 tokens; return the detokenizer and deltas."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas, i = [], 0
    while i < len(output_ids):
        n = rng.randint(1, 3)
        deltas.append(detokenizer.add_tokens(output_ids[i : i + n]))
        i += n
        assert detokenizer.output_text == "".join(deltas)
    return detokenizer, deltas


def test_multibyte_characters_are_split_across_tokens(tokenizer):
    """The premise of the tests below: some tokens hold part of a character."""
    ids = tokenizer.encode("✓ 日本語 😀", add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_deltas_of_valid_text_add_up_and_never_show_partial_characters(tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        prompt_ids = tokenizer.encode(random_text(rng))
        output_ids = tokenizer.encode(random_text(rng), add_special_tokens=False)
        if rng.random() < 0.3:
            output_ids.append(rng.choice(tokenizer.eos_token_ids))  # skipped special token
        full = tokenizer.decode(output_ids)
        detokenizer, deltas = _stream(tokenizer, prompt_ids, output_ids, rng)
        assert "".join(deltas) == full
        assert not any("\ufffd" in delta for delta in deltas)
        assert detokenizer.flush() == ""


def test_deltas_of_random_ids_add_up_to_decode(tokenizer):
    """Arbitrary ids, invalid UTF-8 included: deltas plus the flushed tail equal decode(ids)."""
    rng = random.Random(1)
    for _ in range(200):
        prompt_ids = tokenizer.encode(random_text(rng))
        output_ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 20))]
        full = tokenizer.decode(output_ids)
        detokenizer, deltas = _stream(tokenizer, prompt_ids, output_ids, rng)
        streamed = "".join(deltas)
        assert full.startswith(streamed)
        assert streamed + detokenizer.flush() == full
        assert detokenizer.output_text == full
        if "\ufffd" not in full:
            assert streamed == full


def test_split_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("a日", add_special_tokens=False)
    partial = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert partial, "expected '日' to span several tokens"
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("x"))
    deltas = [detokenizer.add_tokens([i]) for i in ids]
    assert deltas[-1].endswith("日") and "".join(deltas) == "a日"
    assert all(delta == "" for delta in deltas[ids.index(partial[0]) : -1])


def test_keep_special_tokens(tokenizer):
    output_ids = [*tokenizer.encode("ab", add_special_tokens=False), 1]
    detokenizer = IncrementalDetokenizer(tokenizer, [0], skip_special_tokens=False)
    for i in output_ids:
        detokenizer.add_tokens([i])
    assert detokenizer.output_text == f"ab{EOS}"


# --- StopStringMatcher -------------------------------------------------------------------------


def _first_stop_reference(text: str, stop: tuple[str, ...]) -> str | None:
    """Character by character: the text before the first stop string to complete."""
    for end in range(1, len(text) + 1):
        matches = [end - len(s) for s in stop if text[:end].endswith(s)]
        if matches:
            return text[: min(matches)]
    return None


def test_truncates_before_earliest_match():
    matcher = StopStringMatcher(("goodbye", "o w"))
    assert matcher.find("hello world, goodbye") == "hell"


def test_no_match_returns_none():
    matcher = StopStringMatcher(("STOP",))
    assert matcher.find("stop it") is None
    assert matcher.find("stop it, ST") is None


def test_match_spanning_deltas():
    matcher = StopStringMatcher(("STOP", "\n\n"))
    text = ""
    results = []
    for delta in ["xx S", "T", "O", "P and more"]:
        text += delta
        results.append(matcher.find(text))
    assert results == [None, None, None, "xx "]


def test_first_to_complete_wins_regardless_of_delta_boundaries():
    # "c" completes before "abcd" does; the answer must not depend on how text arrives.
    for deltas in (["abcd"], ["ab", "cd"], ["a", "b", "c", "d"]):
        matcher = StopStringMatcher(("abcd", "c"))
        text, found = "", None
        for delta in deltas:
            text += delta
            found = matcher.find(text)
            if found is not None:
                break
        assert found == "ab"


def test_longest_match_wins_a_tie():
    assert StopStringMatcher(("bc", "abc")).find("xxabc") == "xx"


@pytest.mark.parametrize(
    "text, expected",
    [("Hello, wor", 3), ("Hello, w", 1), ("Hello", 0), ("", 0), ("en", 2), ("the e", 1)],
)
def test_holdback(text, expected):
    assert StopStringMatcher(("world", "end")).holdback(text) == expected


def test_streaming_never_shows_text_a_stop_string_later_removes():
    """Random texts and chunkings, streamed as the engine does, against the reference."""
    rng = random.Random(2)
    for _ in range(300):
        stop = tuple({"".join(rng.choice("ab ") for _ in range(rng.randint(1, 4))) for _ in "xy"})
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        matcher = StopStringMatcher(stop)
        shown, accumulated, final = "", "", None
        i = 0
        while i < len(text) and final is None:
            n = rng.randint(1, 5)
            accumulated += text[i : i + n]
            i += n
            final = matcher.find(accumulated)
            if final is None:
                visible = accumulated[: len(accumulated) - matcher.holdback(accumulated)]
                shown = visible if len(visible) > len(shown) else shown
        expected = _first_stop_reference(text, stop)
        assert final == expected
        assert (final if final is not None else text).startswith(shown)


@pytest.mark.parametrize("stop", [(), ("",), ("ok", "")])
def test_invalid_stop_strings(stop):
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher(stop)
