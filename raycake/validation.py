"""Input checks shared by every config, policy and entry point, with messages that name the field.

Every check raises ``ValueError("<field>: expected <what>, got <value>")``, so a user reading a
traceback from a YAML file, a CLI flag or an HTTP body learns which field and what it should be.
Booleans are never accepted as numbers (``True`` is an ``int`` in Python, and ``max_tokens: true``
in a request is a mistake, not a 1). Pure Python: the policies import it without torch or Ray.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any


def require(condition: bool, field_name: str, expected: str, got: Any) -> None:
    """Raise ``ValueError`` naming ``field_name`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(f"{field_name}: expected {expected}, got {got!r}")


def is_int(value: Any) -> bool:
    """An integer, and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value: Any, minimum: int = 0) -> bool:
    """An integer (not a bool) of at least ``minimum``."""
    return is_int(value) and value >= minimum


def is_number(value: Any) -> bool:
    """A finite int or float, and not a bool (NaN and infinities are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(
    field_name: str, value: Any, *, low: int | None = None, high: int | None = None
) -> None:
    """An integer within ``[low, high]`` (either bound optional)."""
    ok = is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if ok:
        return
    if low is not None and high is not None:
        expected = f"an integer in [{low}, {high}]"
    elif low is not None:
        expected = "a positive integer" if low == 1 else f"an integer >= {low}"
    elif high is not None:
        expected = f"an integer <= {high}"
    else:
        expected = "an integer"
    raise ValueError(f"{field_name}: expected {expected}, got {value!r}")


def check_count(field_name: str, value: Any, minimum: int = 0) -> None:
    """An integer (not a bool) of at least ``minimum``: "<field>: expected an integer >= N"."""
    require(is_count(value, minimum), field_name, f"an integer >= {minimum}", value)


def check_positive_int(field_name: str, value: Any) -> None:
    check_int(field_name, value, low=1)


def check_number(
    field_name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_exclusive: bool = False,
) -> None:
    """A finite number within ``[low, high]`` (``(low, high]`` with ``low_exclusive``)."""
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_exclusive else value >= low
    if ok and high is not None:
        ok = value <= high
    if ok:
        return
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_exclusive else '>='} {low:g}")
    if high is not None:
        parts.append(f"<= {high:g}")
    bounds = f" {' and '.join(parts)}" if parts else ""
    raise ValueError(f"{field_name}: expected a finite number{bounds}, got {value!r}")


def check_bool(field_name: str, value: Any) -> None:
    require(isinstance(value, bool), field_name, "true or false", value)


def check_choice(field_name: str, value: Any, choices: Collection[Any]) -> None:
    require(value in choices, field_name, f"one of {sorted(choices)}", value)


def check_token_ids(field_name: str, token_ids: Sequence[Any], vocab_size: int) -> None:
    """Integer (not bool) token ids in ``[0, vocab_size)``; the message names the first bad one."""
    for index, token in enumerate(token_ids):
        if is_int(token) and 0 <= token < vocab_size:
            continue
        if isinstance(token, bool):
            why = "a boolean, not a token id"
        elif not is_int(token):
            why = "not an integer"
        else:
            why = "outside the vocabulary"
        raise ValueError(
            f"{field_name}: expected integer token ids in [0, {vocab_size}), got {token!r} at "
            f"index {index} ({why})"
        )


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a ``.json`` or ``.yaml`` config file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def from_mapping(cls: type, data: Any, where: str, nested: dict[str, type] | None = None) -> Any:
    """A config dataclass from a dict whose ``nested`` sections are dicts too; a section type
    with its own ``from_dict`` builds itself. Unknown keys are an error that names them."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; expected {sorted(known)}")
    kwargs = dict(data)
    for key, section in (nested or {}).items():
        if key in kwargs and kwargs[key] is not None:
            build = getattr(section, "from_dict", None)
            value = kwargs[key]
            kwargs[key] = build(value) if build else from_mapping(section, value, f"{where} {key}")
    return cls(**kwargs)
