"""raycake: Ray-native LLM serving.

The public names load lazily, so pure-Python parts (scheduler, policies) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StreamDelta"]

_EXPORTS = {
    "LLM": "raycake.llm",
    "CompletionOutput": "raycake.engine.request_output",
    "RequestOutput": "raycake.engine.request_output",
    "StreamDelta": "raycake.engine.request_output",
    "SamplingParams": "raycake.engine.sampling_params",
}

if TYPE_CHECKING:
    from raycake.engine.request_output import CompletionOutput, RequestOutput, StreamDelta
    from raycake.engine.sampling_params import SamplingParams
    from raycake.llm import LLM


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raycake' has no attribute {name!r}")
