"""Files shipped inside the package: the embedded models (``raycake train`` output).

``"default"`` is the dense 4M-parameter Llama; ``"default-moe"`` its Switch-MoE sibling (8
experts in every other layer, top-1), trained on the same tokens with the same tokenizer;
``"default-titans"`` a Titans MAG model of about the dense model's size (a 32-token sliding
window, neural memory in layers 1 and 3), trained on the same tokens with the same tokenizer
plus 1 passkey-recall sequence in 16.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "default"
DEFAULT_MOE_MODEL_NAME = "default-moe"
DEFAULT_TITANS_MODEL_NAME = "default-titans"

_ASSETS = Path(__file__).resolve().parent
EMBEDDED_MODELS = {
    DEFAULT_MODEL_NAME: _ASSETS / "default_model",
    DEFAULT_MOE_MODEL_NAME: _ASSETS / "default_moe_model",
    DEFAULT_TITANS_MODEL_NAME: _ASSETS / "default_titans_model",
}
# How each embedded model was built, for the error when its files are missing.
_TRAIN_COMMANDS = {
    DEFAULT_MODEL_NAME: "raycake train --out-dir raycake/assets/default_model",
    DEFAULT_MOE_MODEL_NAME: (
        "raycake train --out-dir raycake/assets/default_moe_model --steps 2000 --num-experts 8 "
        "--tokenizer-dir raycake/assets/default_model --save-dtype bfloat16"
    ),
    DEFAULT_TITANS_MODEL_NAME: (
        "raycake train --arch titans-mag --out-dir raycake/assets/default_titans_model "
        "--tokenizer-dir raycake/assets/default_model --save-dtype bfloat16 --steps 750 "
        "--intermediate-size 600 --max-position-embeddings 16384 --sliding-window 32 "
        "--num-persistent-tokens 4 --memory-layers 1,3 --memory-heads 2 --memory-head-dim 64 "
        "--memory-depth 2 --memory-expansion 2 --memory-chunk-size 16 --memory-max-lr 0.1 "
        "--recall-fraction 0.0625 --num-threads 1"
    ),
}


def default_model_dir() -> Path:
    return EMBEDDED_MODELS[DEFAULT_MODEL_NAME]


def default_moe_model_dir() -> Path:
    return EMBEDDED_MODELS[DEFAULT_MOE_MODEL_NAME]


def default_titans_model_dir() -> Path:
    return EMBEDDED_MODELS[DEFAULT_TITANS_MODEL_NAME]


# The EAGLE-1 draft head for "default" (``raycake train-eagle`` output): a draft model, not a
# target, so it is not in EMBEDDED_MODELS.
DEFAULT_EAGLE_HEAD_TRAIN_COMMAND = (
    "raycake train-eagle --out-dir raycake/assets/default_model_eagle --cache-windows 8192"
)


def default_eagle_head_dir() -> Path:
    return _ASSETS / "default_model_eagle"


def train_command(name: str) -> str:
    """The command that rebuilds embedded model ``name``."""
    return _TRAIN_COMMANDS[name]


def resolve_draft_model(draft_model: str) -> Path:
    """``"default"`` names the embedded model's EAGLE head; anything else is a head folder."""
    if draft_model != "default":
        return Path(draft_model).expanduser()
    path = default_eagle_head_dir()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: the embedded EAGLE head is missing from this install; rebuild it with "
            f"`{DEFAULT_EAGLE_HEAD_TRAIN_COMMAND}`"
        )
    return path
