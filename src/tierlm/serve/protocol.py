"""Request bodies of the OpenAI-compatible API, as strict pydantic models.

Unknown fields and wrong types are refused (`extra="forbid"`, `strict=True`): the server answers
400 with an OpenAI-style error body naming the field. Fields the OpenAI API has but the engine
cannot honour (logprobs, penalties, tools, ...) are accepted only at their neutral value, so a
client that sends `"logprobs": null` works and one that asks for logprobs learns why not.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None     # vLLM; accepted, usage is sent on the last chunk


class _Sampling(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM extras)."""
    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    # vLLM's extra sampling fields
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    return_token_ids: Optional[bool] = None            # vLLM: token ids in each choice
    # OpenAI fields accepted only at their neutral value (see `unsupported`)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    best_of: Optional[int] = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, reason) for the first field set to something the engine cannot do."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, f"{name} is not supported by the tierlm engine (only 0)"
        if self.repetition_penalty not in (None, 1, 1.0):
            return "repetition_penalty", "repetition_penalty is not supported by the tierlm engine (only 1)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by the tierlm engine"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported by the tierlm engine (only best_of == n)"
        return None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    echo: bool = False
    logprobs: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self):
        if self.logprobs is not None:
            return "logprobs", "logprobs are not available: the tierlm engine does not return them yet"
        if self.echo:
            return "echo", "echo is not supported by tierlm serve"
        if self.suffix:
            return "suffix", "suffix is not supported by tierlm serve"
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    refusal: Optional[str] = None
    reasoning_content: Optional[str] = None

    def for_template(self) -> dict:
        """The message as chat templates expect it: content is a string."""
        out = {k: v for k, v in self.model_dump().items() if v is not None}
        if isinstance(self.content, list):
            out["content"] = "".join(p.text for p in self.content)
        out.setdefault("content", "")
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None
    # vLLM's chat extras
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def unsupported(self):
        if self.logprobs or self.top_logprobs:
            return "logprobs", "logprobs are not available: the tierlm engine does not return them yet"
        if self.tools:
            return "tools", "tool calling is not supported by tierlm serve"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice", "tool calling is not supported by tierlm serve"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format", "structured output (response_format) is not supported by tierlm serve"
        return super().unsupported()


class PlanRequest(_Strict):
    """Body of POST /v1/plan: the options of `tierlm plan`, one plan per model x context."""
    models: list[Union[str, dict[str, Any]]] = Field(min_length=1, max_length=16)
    context: Union[int, str, list[Union[int, str]]] = "128k"
    batch: int = Field(1, ge=1)
    kv_dtype: str = "bf16"
    indexer_dtype: str = "bf16"
    state_dtype: str = "auto"
    mtp: bool = False
    hardware: str = "h200"
    devices: Optional[int] = None
    layout: str = "ideal"
    weight_dtypes: Optional[dict[str, str]] = None
    gpu_util: float = 0.9
    allow_unknown_fields: bool = False
