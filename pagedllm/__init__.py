"""pagedllm: an LLM inference and serving engine with a paged KV cache and continuous batching."""

from pagedllm.engine.host_memory import use_transparent_huge_pages

use_transparent_huge_pages()  # before the first tensor, which fixes PyTorch's choice for the process

from pagedllm.config import EngineConfig  # noqa: E402
from pagedllm.engine.output import CompletionOutput, RequestOutput  # noqa: E402
from pagedllm.llm import LLM  # noqa: E402
from pagedllm.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
