"""Request bodies of the OpenAI-compatible API and the errors they turn into.

Every field's type and range is checked here, before a request can join a batch: a value
that would make the sampler raise or produce NaN for one row (a seed torch cannot take,
a temperature so small that logits / T overflows, a text torch's tokenizer cannot
encode) must be one client's 400, never a failure of the batch it shares with others.

Types are strict: "0.5" is not a number and "true" is not a boolean, so a client bug
surfaces as a 400 instead of being silently coerced. Unknown fields (user, ...) are
accepted and ignored, as many clients send them by default; fields whose effect we do
not implement (tools, response_format, ...) are refused by name (see UNSUPPORTED).
"""
from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError, field_validator, model_validator)

Number = StrictFloat | StrictInt
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts
# Below this temperature a request is greedy: logits / T would overflow float32 (1e-38 gave
# NaN probabilities), and at T = 1e-3 a logit gap of 0.01 already weighs e^10: argmax anyway.
GREEDY_BELOW = 1e-3
MAX_STOP_CHARS = 256  # the stop matcher rescans held text per token: long stops would stall every row
MAX_N = 16

# Fields we do not implement. A client that sets one expects its effect, so silence would
# be a lie: 400 naming the field. Their "off" values (which some clients send by default)
# are accepted; so is null.
UNSUPPORTED = {"tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
               "response_format": ({"type": "text"},), "best_of": (1,), "suffix": ("",), "logit_bias": ({},)}


class APIError(Exception):
    """An error returned to the client as {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text contains an unpaired surrogate (\\ud800-\\udfff), which is not valid Unicode")
    return text


Text = Annotated[StrictStr, AfterValidator(_encodable)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # "developer" is OpenAI's newer name for "system"; tools are not supported.
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Text | None = None
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    presence_penalty: Number = Field(0, ge=-2, le=2)
    frequency_penalty: Number = Field(0, ge=-2, le=2)
    max_tokens: StrictInt | None = Field(None, ge=1)
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        for name, off in UNSUPPORTED.items():
            if isinstance(data, dict) and data.get(name) is not None and data[name] not in off:
                raise APIError(400, f"'{name}' is not supported by this server.", param=name,
                               code="unsupported_parameter")
        return data

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop must be a string or a list of up to 4 strings of 1 to {MAX_STOP_CHARS} characters")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def effective_temperature(self) -> float:
        t = 1.0 if self.temperature is None else float(self.temperature)
        return 0.0 if t < GREEDY_BELOW else t


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs")
        return self

    def top_count(self) -> int | None:
        """Alternatives per token to report, or None for no logprobs at all."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: Text
    logprobs: StrictInt | None = Field(None, ge=0, le=5)  # the legacy API: how many alternatives
    echo: StrictBool = False

    @model_validator(mode="after")
    def _echo_without_logprobs(self):
        # Logprobs of echoed prompt tokens need a forward pass over the whole prompt that
        # generation does not make (it keeps only the last position's logits).
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported.", param="echo")
        return self

    def top_count(self) -> int | None:
        return self.logprobs


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """Bytes -> validated request, or an APIError naming the offending field."""
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)  # NaN / Infinity are not JSON
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"We could not parse the JSON body of your request: {err}") from None
    except RecursionError:  # e.g. thousands of nested "["
        raise APIError(400, "We could not parse the JSON body of your request: it is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"]]
        # Union members add their type name to the location (e.g. "temperature.float"); drop it.
        loc = [p for p in loc if "[" not in p and p not in {"str", "int", "float", "bool"}]
        param = ".".join(loc) or None
        raise APIError(400, f"Invalid value for '{param}': {first['msg']}", param=param) from None
