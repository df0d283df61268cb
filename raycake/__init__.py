"""raycake: Ray-native LLM serving."""

from raycake.engine.request_output import CompletionOutput, RequestOutput, StreamDelta
from raycake.engine.sampling_params import SamplingParams
from raycake.llm import LLM

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StreamDelta"]
__version__ = "0.1.0"
