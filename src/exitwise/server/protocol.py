"""Request and response bodies in the OpenAI shape, plus exitwise's per-request extensions.

Requests ignore fields they do not know (clients send ``user``, ``presence_penalty``, ...) rather than
rejecting them; range checks that pydantic can express live here so that a bad value fails with the
field's name. Checks that need the model (context length, layer count) are in :mod:`.app`.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_OMIT_NONE = dict(default=None, exclude_if=lambda v: v is None)  # extension fields appear only when set


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0.0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # extension (0 = off)
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    seed: int | None = None
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension
    # early-exit extensions
    exit_threshold: float | None = None
    exit_min_layer: int | None = Field(default=None, ge=1)
    alpha: float | None = Field(default=None, gt=0.0, lt=1.0)  # heads criterion: calibrated agreement level
    return_exit_layers: bool = False  # per-token hidden-state index the token was read out at
    return_token_ids: bool = False  # completion token ids (exact comparisons, detokenisation elsewhere)

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, gt=0)  # OpenAI's default for completions
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) != 1:
                raise ValueError("one prompt per request (batch prompts are not supported)")
            v = v[0]
        if len(v) == 0:
            raise ValueError("is empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """Content as plain text: a list of parts contributes its ``text`` parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


# ------------------------------------------------------------------------------------------ responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    exit_layers: list[int] | None = Field(**_OMIT_NONE)
    token_ids: list[int] | None = Field(**_OMIT_NONE)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None
    exit_layers: list[int] | None = Field(**_OMIT_NONE)
    token_ids: list[int] | None = Field(**_OMIT_NONE)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(**_OMIT_NONE)
    content: str | None = Field(**_OMIT_NONE)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None
    exit_layers: list[int] | None = Field(**_OMIT_NONE)
    token_ids: list[int] | None = Field(**_OMIT_NONE)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(**_OMIT_NONE)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "exitwise"
    max_model_len: int
    num_layers: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
