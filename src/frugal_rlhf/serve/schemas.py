"""Request bodies of the OpenAI-compatible API and the errors they turn into.

Fields use strict types: "0.5" is not a number and "true" is not a boolean, so a client
bug surfaces as a 400 instead of being silently coerced. Unknown fields (user,
frequency_penalty, ...) are accepted and ignored, as many clients send them by default.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

Number = StrictFloat | StrictInt


class APIError(Exception):
    """An error returned to the client as {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # "developer" is OpenAI's newer name for "system"; tools are not supported.
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=1)  # one choice per request

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be a non-empty string or a list of up to 4 non-empty strings",
                           param="stop")
        return tuple(stops)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(SamplingFields):
    prompt: StrictStr


def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """Bytes -> validated request, or an APIError naming the offending field."""
    import json

    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"We could not parse the JSON body of your request: {err}") from None
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
