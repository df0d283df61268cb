"""Files shipped inside the package: the embedded default model (``raycake train`` output)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "default"


def default_model_dir() -> Path:
    return Path(__file__).resolve().parent / "default_model"
