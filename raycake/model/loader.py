"""Hugging Face checkpoint folders, as they are: config.json + one or many safetensors files.

Loading maps each checkpoint tensor onto raycake's parameters (fusing q/k/v and gate/up) and
checks every shape; saving writes the inverse, so transformers loads what raycake saves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from raycake.model.config import ModelConfig, MoEConfig
from raycake.model.llama import LlamaForCausalLM
from raycake.model.titans_mag import build_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_INDEX = "model.safetensors.index.json"

# checkpoint projection -> (raycake fused parameter, shard index within it)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Buffers some older checkpoints carry; recomputed here, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or tensor."""


def read_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found in the checkpoint folder")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return ModelConfig.from_hf_config(hf)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or the lone ``*.safetensors``."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{index}: not valid JSON ({exc})") from exc
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index}: names shard {file.name}, which is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weights found")
    return files


# Mixtral's per-expert layout, which transformers writes: w1 = gate, w3 = up, w2 = down.
_LEGACY_EXPERT = re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def _identity(data: torch.Tensor) -> torch.Tensor:
    return data


def _place(name: str, config: ModelConfig) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """raycake parameter for a checkpoint tensor, and the view of it the tensor fills."""
    legacy = _LEGACY_EXPERT.match(name)
    if legacy:
        prefix, expert, which = legacy.group(1), int(legacy.group(2)), legacy.group(3)
        if which == "w2":
            return f"{prefix}.mlp.experts.down_proj", lambda d: d[expert]
        size = config.intermediate_size
        start = 0 if which == "w1" else size
        return f"{prefix}.mlp.experts.gate_up_proj", lambda d: d[expert].narrow(0, start, size)
    if ".block_sparse_moe." in name:
        return name.replace(".block_sparse_moe.", ".mlp."), _identity
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in _FUSED:
        fused, shard = _FUSED[parts[-2]]
        start, size = _shard_slices(config, fused)[shard]
        return ".".join([*parts[:-2], fused, parts[-1]]), lambda d: d.narrow(0, start, size)
    return name, _identity


def _shard_slices(config: ModelConfig, fused: str) -> list[tuple[int, int]]:
    if fused == "qkv_proj":
        sizes = [config.q_size, config.kv_size, config.kv_size]
    else:
        sizes = [config.intermediate_size, config.intermediate_size]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return list(zip(offsets, sizes, strict=True))


def load_weights(model: LlamaForCausalLM, model_dir: str | Path) -> None:
    """Copy every checkpoint tensor into ``model``; fail on unknown, missing or misshapen tensors."""
    config = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    # Elements written per parameter: a fused or stacked one is complete when all its parts are.
    filled = dict.fromkeys(params, 0)
    for file in checkpoint_files(model_dir):
        try:
            opened = safe_open(str(file), framework="pt")
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
        with opened as reader:
            for name in reader.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                target, view = _place(name, config)
                if target not in params:
                    raise CheckpointError(
                        f"{file.name}: tensor {name!r} has no place in {config.architecture}"
                    )
                tensor = reader.get_tensor(name)
                dest = view(params[target].data)
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise CheckpointError(
                        f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(dest.shape)} from config.json"
                    )
                dest.copy_(tensor)
                filled[target] += dest.numel()
    if config.tie_word_embeddings:
        filled["lm_head.weight"] = filled["model.embed_tokens.weight"]
    missing = [name for name, count in filled.items() if count < params[name].numel()]
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint lacks tensors for {missing[:8]}")


def load_model(
    model_dir: str | Path,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    moe: MoEConfig | None = None,
    quantization: str | None = None,
    int8_threshold: float = 6.0,
) -> LlamaForCausalLM:
    """Build the model described by ``config.json`` and fill it from the safetensors files.

    ``quantization="int8"`` then swaps every attention/MLP/expert projection for LLM.int8()
    (int8 weights with per-channel scales; outlier activation features stay in ``dtype``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if quantization not in (None, "int8"):
        raise ValueError(f"quantization: expected 'int8' or None, got {quantization!r}")
    config = read_model_config(model_dir)
    with torch.device("meta"):
        model = build_model(config, moe)
    # Materialize in the target dtype: the checkpoint is converted tensor by tensor on copy.
    model = model.to_empty(device=device).to(DTYPES[dtype])
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, model_dir)
    model = model.eval()
    # NOTE: RoPE frequencies stay fp32 in every weight dtype, as in transformers.
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    if quantization == "int8":
        from raycake.model.int8_linear import quantize_model

        quantize_model(model, threshold=int8_threshold)
    return model


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names (fused projections split back)."""
    config = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        parts = name.split(".")
        fused = parts[-2] if len(parts) >= 2 else ""
        if fused == "experts" or (name.endswith(".mlp.gate.weight") and config.num_experts):
            out.update(_legacy_moe_tensors(name, tensor, config))
        elif fused in ("qkv_proj", "gate_up_proj"):
            names = (
                ["q_proj", "k_proj", "v_proj"] if fused == "qkv_proj" else ["gate_proj", "up_proj"]
            )
            for proj, (start, size) in zip(names, _shard_slices(config, fused), strict=True):
                key = ".".join([*parts[:-2], proj, parts[-1]])
                out[key] = tensor.narrow(0, start, size).contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def _legacy_moe_tensors(
    name: str, tensor: torch.Tensor, config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Mixtral weights under the per-expert names transformers writes (and reads)."""
    prefix = name.split(".mlp.")[0] + ".block_sparse_moe"
    if name.endswith(".mlp.gate.weight"):
        return {f"{prefix}.gate.weight": tensor.contiguous()}
    size = config.intermediate_size
    out = {}
    for expert in range(tensor.shape[0]):
        base = f"{prefix}.experts.{expert}"
        if name.endswith("down_proj"):
            out[f"{base}.w2.weight"] = tensor[expert].contiguous()
        else:
            out[f"{base}.w1.weight"] = tensor[expert, :size].contiguous()
            out[f"{base}.w3.weight"] = tensor[expert, size:].contiguous()
    return out


def save_checkpoint(model: LlamaForCausalLM, out_dir: str | Path, dtype: str = "float32") -> None:
    """Write ``config.json`` + ``model.safetensors`` that transformers and raycake both load."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(DTYPES[dtype]) for k, v in hf_state_dict(model).items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_hf_config(dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def resolve_model_path(model: str | Path) -> Path:
    """``"default"`` / ``"default-moe"`` name the embedded models; anything else is a folder."""
    from raycake.assets import EMBEDDED_MODELS, train_command

    if str(model) in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[str(model)]
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path}: the embedded model {str(model)!r} is missing from this install; "
                f"rebuild it with `{train_command(str(model))}`"
            )
        return path
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"model: {str(model)!r} is neither an embedded model ({sorted(EMBEDDED_MODELS)}) "
            "nor an existing checkpoint folder "
            "(raycake loads local Hugging Face folders; nothing is downloaded)"
        )
    return path
