"""The early-exit inference engine: paged KV cache, continuous batching, lean Llama runner."""

from exitwise.engine.llm import LLM, LLMEngine, RequestOutput
from exitwise.engine.sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams"]
