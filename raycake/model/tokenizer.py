"""Text in and out of a checkpoint folder: encoding, chat templates, streaming decode, stop strings.

``Tokenizer`` reads what Hugging Face checkpoints ship (``tokenizer.json``, ``tokenizer_config.json``,
``generation_config.json``) without transformers. ``IncrementalDetokenizer`` turns each step's new
token ids into a text delta; ``StopStringMatcher`` ends a request at a stop string and holds back
text that may still become one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Written beside tokenizer_config.json by recent transformers; it wins over the config's template.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# The embedded models were trained on Python source, not on chats, and ship no template. Theirs
# renders a conversation as one source file the model can continue: system messages become
# comment lines, every other message is its text, one after the other; the model's answer is
# whatever follows (no generation prompt: there is no marker it was trained to answer after).
EMBEDDED_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '# ' + message['content'] | replace('\\n', '\\n# ') + '\\n' }}"
    "{% else %}"
    "{{ message['content'] }}"
    "{% endif %}"
    "{% endfor %}"
)


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file is absent."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _default_chat_template(value: Any) -> str | None:
    """HF stores one template, or a list of ``{name, template}``; the served one is "default"."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON, as in transformers.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Tokenizer:
    """A checkpoint's tokenizer: ``tokenizer.json`` plus the special tokens and chat template.

    NOTE: ``decode`` does not apply transformers' ``clean_up_tokenization_spaces``, so decoded text
    is exactly what the tokens spell and streamed deltas always add up to ``decode(all ids)``.
    """

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        add_bos_token: bool = False,
        chat_template: str | None = None,
        source: str = "tokenizer",
    ) -> None:
        self._tokenizer = tokenizer
        self.source = source  # named in error messages
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None  # compiled on first use
        self._bos_token_id = self._require_id(bos_token) if bos_token is not None else None
        eos_ids = [] if eos_token is None else [self._require_id(eos_token)]
        # Ordered union: a model may end on any of them (Llama 3 Instruct: <|eot_id|> too).
        self._eos_token_ids = tuple(dict.fromkeys([*eos_ids, *extra_eos_token_ids]))

    def _require_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.source}: special token {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load a Hugging Face checkpoint folder's tokenizer (nothing is downloaded)."""
        model_dir = Path(model_dir)
        path = model_dir / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{path}: tokenizer.json not found in the checkpoint folder")
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for every parse error
            raise ValueError(f"{path}: not a valid tokenizers file ({exc})") from exc

        config = _read_json(model_dir / TOKENIZER_CONFIG_FILE) or {}
        generation = _read_json(model_dir / GENERATION_CONFIG_FILE) or {}
        gen_eos = generation.get("eos_token_id")
        gen_eos_ids = (
            gen_eos if isinstance(gen_eos, list) else ([] if gen_eos is None else [gen_eos])
        )
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in gen_eos_ids):
            raise ValueError(
                f"{model_dir / GENERATION_CONFIG_FILE}: eos_token_id: expected an integer or a "
                f"list of integers, got {gen_eos!r}"
            )
        template_file = model_dir / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            chat_template: str | None = template_file.read_text(encoding="utf-8")
        else:
            chat_template = _default_chat_template(config.get("chat_template"))
        if chat_template is None and _is_embedded_model(model_dir):
            chat_template = EMBEDDED_CHAT_TEMPLATE
        return cls(
            tokenizer,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            extra_eos_token_ids=gen_eos_ids,
            add_bos_token=config.get("add_bos_token") is True,
            chat_template=chat_template,
            source=str(model_dir),
        )

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added special tokens included (``len()`` in HF)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """tokenizer_config.json's eos_token, then generation_config.json's eos_token_id(s)."""
        return self._eos_token_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with special tokens, exactly one BOS where the model expects one.

        The tokenizer.json post-processor adds BOS (Llama 3); ``add_bos_token: true`` adds it
        for tokenizer.json files without one. Text that already starts with the BOS token (a
        rendered chat template) does not get a second.
        """
        if not isinstance(text, str):
            raise TypeError(f"text: expected a string, got {type(text).__name__}")
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self._bos_token_id
        if not add_special_tokens or bos is None:
            return ids
        if self.add_bos_token and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        if ids[:2] == [bos, bos] and self.bos_token is not None and text.startswith(self.bos_token):
            del ids[0]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation with the checkpoint's Jinja chat template, as transformers does."""
        if self.chat_template is None:
            raise ValueError(
                f"{self.source}: this checkpoint has no chat template (no 'chat_template' in "
                f"{TOKENIZER_CONFIG_FILE} and no {CHAT_TEMPLATE_FILE}); send a plain prompt instead"
            )
        _validate_messages(messages)
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template, self.source)
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        try:
            return self._compiled_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **{name: token for name, token in special.items() if token is not None},
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template: {exc}") from exc


def _is_embedded_model(model_dir: Path) -> bool:
    """One of the models shipped in ``raycake/assets`` (any other folder keeps its own template,
    or has none: a checkpoint's chat format is not something to guess)."""
    from raycake.assets import EMBEDDED_MODELS

    here = model_dir.resolve()
    return any(here == path.resolve() for path in EMBEDDED_MODELS.values())


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role', 'content'} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: expected a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(
                    f"messages[{i}].{key}: expected a string, got {message.get(key)!r}"
                )


def _compile_template(template: str, source: str) -> jinja2.Template:
    # NOTE: templates come from untrusted checkpoints; the sandbox forbids mutation and dunders.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"{source}: chat template does not parse: {exc}") from exc


# How many prompt tokens precede the first output token in the decode window (as in vLLM): enough
# context for decoders whose output depends on the previous token (leading spaces, byte fallback).
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a request's stream of output token ids into text deltas, decoding a short window.

    Each call decodes ``ids[prefix_offset:]`` and ``ids[prefix_offset:read_offset]``; the delta is
    what the longer text adds. A text ending in U+FFFD is an incomplete UTF-8 character (byte-level
    BPE splits them across tokens): it is held back until a later token completes it. Then both
    offsets move forward, so the window stays a few tokens long.

    NOTE: the concatenated deltas equal ``tokenizer.decode(output ids)`` once the output ends on a
    complete character; ``flush()`` releases an incomplete tail (as U+FFFD) at the end of a stream.
    The prompt is assumed to end on a character boundary (true of any prompt encoded from text).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # window start: context already turned into text
        self._read_offset = len(self._ids)  # ids before this are in output_text
        self._text = ""

    @property
    def output_text(self) -> str:
        """All finalized output text so far."""
        return self._text

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Append new output token ids; return the newly finalized text (possibly empty)."""
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing visible yet, or a character still incomplete
        return self._advance(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """At the end of a stream, release held-back text, incomplete characters as U+FFFD."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        return self._advance(new_text[len(prefix_text) :])

    def _advance(self, delta: str) -> str:
        # Drop ids that no longer serve as context so the list does not grow with the output.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._text += delta
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self._ids[start:end], self.skip_special_tokens)


class StopStringMatcher:
    """Finds the first stop string in a growing output text.

    Contract: call ``find`` with the whole output text after each delta (the text only grows).
    ``find`` returns the text before the first stop string to complete, the stop string excluded,
    or None. "First" is as if the text arrived one character at a time (earliest end; the longest
    match on a tie), so the result does not depend on how the text was split into deltas. Only
    the tail that can hold a new match is searched: the delta plus ``max_len - 1`` characters.

    While streaming, show ``text[: len(text) - holdback(text)]``: the held-back tail could be the
    start of a stop string, so text later cut off by a match is never shown.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        stop = tuple(stop)
        if not stop or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop: expected one or more non-empty strings, got {stop!r}")
        self.stop = stop
        self.max_len = max(len(s) for s in stop)
        self._searched_len = 0  # length of the text at the previous find()

    def find(self, text: str) -> str | None:
        """``text`` cut before the first stop string to complete, or None if none occurs."""
        start = max(0, self._searched_len - self.max_len + 1)
        self._searched_len = len(text)
        best: tuple[int, int] | None = None  # (end, start) of the first match so far
        for s in self.stop:
            i = text.find(s, start)
            if i >= 0 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
        return None if best is None else text[: best[1]]

    def holdback(self, text: str) -> int:
        """How many trailing characters of ``text`` could begin a stop string (0 if none)."""
        for n in range(min(self.max_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop if len(s) > n):
                return n
        return 0
