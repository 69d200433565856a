"""pagedllm: an LLM inference and serving engine with a paged KV cache and continuous batching."""

from pagedllm.config import EngineConfig
from pagedllm.engine.output import CompletionOutput, RequestOutput
from pagedllm.llm import LLM
from pagedllm.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
