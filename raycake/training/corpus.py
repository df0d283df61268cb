"""The embedded model's corpus: the Python standard library's own source files.

Every machine with Python has it, so the default model can be rebuilt anywhere. Files are split
into train and held-out sets by a hash of their path relative to the stdlib root, so the split is
the same on every machine with the same Python version.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Third-party packages live below the stdlib folder but are not the standard library.
_EXCLUDED_PARTS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class CorpusSplit:
    train: list[Path]
    held_out: list[Path]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every ``.py`` file of the standard library, in a stable order."""
    root = root or stdlib_root()
    files = [
        p
        for p in root.rglob("*.py")
        if not _EXCLUDED_PARTS.intersection(p.relative_to(root).parts) and p.is_file()
    ]
    return sorted(files)


def is_held_out(path: Path, root: Path, held_out_percent: int) -> bool:
    digest = hashlib.sha256(path.relative_to(root).as_posix().encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < held_out_percent


def split_corpus(root: Path | None = None, held_out_percent: int = 2) -> CorpusSplit:
    if not 0 < held_out_percent < 100:
        raise ValueError(f"held_out_percent: expected 1..99, got {held_out_percent}")
    root = root or stdlib_root()
    files = stdlib_files(root)
    if not files:
        raise FileNotFoundError(f"{root}: no Python source files found for the corpus")
    held = [p for p in files if is_held_out(p, root, held_out_percent)]
    held_set = set(held)
    return CorpusSplit(train=[p for p in files if p not in held_set], held_out=held)


def read_texts(files: list[Path]) -> Iterator[str]:
    """File contents; undecodable files (a few stdlib test fixtures) are skipped."""
    for path in files:
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
