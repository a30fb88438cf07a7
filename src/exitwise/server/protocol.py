"""Request and response bodies in the OpenAI shape, plus exitwise's per-request extensions.

Requests are validated strictly (``"3"`` is not an integer, ``true`` is not a token id, ``NaN`` and
``1e400`` are not numbers), from the raw JSON, so a bad value fails with the field's name. Fields
the server does not know are ignored (clients send ``user``, ``metadata``, ...), except the OpenAI
fields that would change the answer and are not implemented (``logprobs``, ``tools``,
``response_format``, penalties, ...): each is refused by name unless it has its neutral value.
Checks that need the model (context length, layer count, vocabulary) are in :mod:`.app`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from exitwise.engine.sampling import SEED_LIMIT

_OMIT_NONE = dict(default=None, exclude_if=lambda v: v is None)  # extension fields appear only when set
_STRICT = ConfigDict(strict=True, allow_inf_nan=False)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat runs to the context)

# OpenAI request fields this server does not implement -> the values that mean "not used".
UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "response_format": ({"type": "text"},), "logit_bias": ({},),
    "presence_penalty": (0,), "frequency_penalty": (0,), "best_of": (1,), "suffix": ("",), "audio": (),
    "modalities": (["text"],), "prediction": (), "web_search_options": (),
}


def _neutral(value: Any, neutral: tuple) -> bool:
    # the type too: True == 1 in Python, but `logprobs: 1` is not `logprobs: true`; 0 and 0.0 alike
    return value is None or any((type(value) is type(n) or {type(value), type(n)} == {int, float}) and value == n
                                for n in neutral)


class StreamOptions(BaseModel):
    model_config = _STRICT | ConfigDict(extra="ignore")

    include_usage: bool = False


class _Request(BaseModel):
    model_config = _STRICT | ConfigDict(extra="allow")  # extras are checked against UNSUPPORTED below

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(default=None, gt=0)
    # OpenAI's range and default; below 1e-5 (0 included) sampling is greedy (see SamplingParams)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # extension (0 = off)
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    # at most 16: every stop string is searched for after every token
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension
    # early-exit extensions: the built-in criteria's confidences lie in [-1, 1] (softmax margin and
    # classifier probability in [0, 1], hidden-state cosine in [-1, 1]); full depth: exit_min_layer = L
    exit_threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    exit_min_layer: int | None = Field(default=None, ge=1)
    alpha: float | None = Field(default=None, gt=0.0, lt=1.0)  # heads criterion: calibrated agreement level
    # speculative servers: "auto", a draft source ("lookup", "exit", "adapter") or "none"; checked by the engine
    draft: str | None = Field(default=None, max_length=16)
    return_exit_layers: bool = False  # per-token hidden-state index the token was read out at
    return_token_ids: bool = False  # completion token ids (exact comparisons, detokenisation elsewhere)

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(stops)}")
        return stops

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and not _neutral(value, UNSUPPORTED[name]):
                # ctx carries the field: a model-level error has no location of its own
                raise PydanticCustomError("unsupported_field", "is not supported by this server",
                                          {"field": name})
        return self


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=COMPLETIONS_DEFAULT_MAX_TOKENS, gt=0)
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

    @field_validator("max_tokens")
    @classmethod
    def _bounded_default(cls, v: int | None) -> int:
        # `null` means the default, as with OpenAI: not "until the context is full"
        return COMPLETIONS_DEFAULT_MAX_TOKENS if v is None else v


class ContentPart(BaseModel):
    model_config = _STRICT | ConfigDict(extra="ignore")

    type: Literal["text"]  # images, audio, files: not for a text-only model
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT | ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """Content as plain text: a list of parts is joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)  # the newer name of max_tokens

    @model_validator(mode="after")
    def _one_max_tokens(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise PydanticCustomError("conflict", "differs from max_tokens (send one of them)",
                                          {"field": "max_completion_tokens"})
            self.max_tokens = self.max_completion_tokens
        return self


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
