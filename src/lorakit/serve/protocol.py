"""The request bodies of the OpenAI-compatible API, as pydantic models, and its error shape.

Every field is typed strictly (no "3" for 3, no true for 1), numbers are finite (JSON's NaN and
Infinity extensions are refused) and in range. OpenAI fields that lorakit does not implement are
accepted only at their neutral value (``n: 1``, ``logprobs: false``, ``tools: []``...): any other
value is a 400 that names the field, never silently ignored. Unknown fields are a 400 too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from lorakit.serve.sampling import MAX_TEMPERATURE, MIN_TEMPERATURE

# Bounds on the work one request can ask for: stop strings are checked after every token.
MAX_STOP_CHARS = 256
MAX_STOPS = 4


# OpenAI fields lorakit does not implement, with the values that ask for nothing (accepted).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none"),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]),
}

# response_format values lorakit implements: plain text, and one JSON object (constrained decoding);
# json_schema is not implemented.
RESPONSE_FORMATS = ({"type": "text"}, {"type": "json_object"})

_FIELD_MESSAGES = {"n": "n must be 1 (one choice per request)",
                   "response_format": "response_format: lorakit implements type text and json_object only"}


class UnsupportedField(ValueError):
    """A field lorakit does not implement, at a value that asks for it."""

    def __init__(self, field: str) -> None:
        self.field = field
        super().__init__(_FIELD_MESSAGES.get(field, f"{field}: lorakit does not implement it; leave it out "
                                                    "(or send its default)"))


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # By type as well as value: True == 1 in Python, but "logprobs": true asks for log-probabilities.
    return any(type(value) is type(n) and value == n for n in neutral)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object"] = Field(
        description="json_object: the answer is always one JSON object (constrained decoding)")


class _Generation(_Body):
    """The sampling fields both completion routes share."""

    model: Annotated[str, StringConstraints(min_length=1, max_length=256)] = Field(
        description="an adapter's name, or the base model's served name")
    max_tokens: int | None = Field(None, ge=1, description="at most this many new tokens (capped by the server)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE,
                               description=f"0 (greedy) or {MIN_TEMPERATURE} to {MAX_TEMPERATURE}")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="the same seed gives the same sample")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, StringConstraints(max_length=256)] | None = None  # accepted, not used
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_is_not_implemented(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for field, neutral in NEUTRAL_VALUES.items():
                if field in data and not _is_neutral(data[field], neutral):
                    raise UnsupportedField(field)
            if data.get("response_format") is not None and not _is_neutral(data["response_format"], RESPONSE_FORMATS):
                raise UnsupportedField("response_format")
            data = {k: v for k, v in data.items() if k not in NEUTRAL_VALUES}
        return data

    @field_validator("temperature")
    @classmethod
    def _temperature_that_cannot_overflow(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or from {MIN_TEMPERATURE} to {MAX_TEMPERATURE}")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def json_object(self) -> bool:
        return self.response_format is not None and self.response_format.type == "json_object"

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: Annotated[str, StringConstraints(max_length=64)] | None = None  # accepted, not used

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    messages: Annotated[list[Message], Field(min_length=1)]


class CompletionRequest(_Generation):
    prompt: Annotated[str, StringConstraints(min_length=1)] | Annotated[
        list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1, max_length=1)]

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class LoadAdapterRequest(_Body):
    lora_name: str = Field(description="the name clients will use as 'model'")
    lora_path: str = Field(description="a directory under the server's --adapter-dir, relative to it")


class UnloadAdapterRequest(_Body):
    lora_name: str


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def describe_validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """(one line naming the first bad field and what is wrong with it, that field) from pydantic's
    errors (as FastAPI reports them, under a leading "body")."""
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, UnsupportedField):
        return str(cause), cause.field
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    # A union's branches add the branch's type to the location (stop.str, stop.list[...]): drop them.
    location = [p for p in location if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    field = ".".join(location) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', message)})", None
    if first.get("type") == "model_attributes_type" or (not location and first.get("type") == "dict_type"):
        return "the body must be a JSON object", None
    return (f"{field}: {message}" if field else message), field
