"""Checking an OpenAI request body before anything runs: JSON that is an object, nests at most MAX_DEPTH
levels, holds finite numbers and valid Unicode; fields of the right type and range at every depth; fields this
server does not implement named in a 400 rather than ignored. Every problem is an `APIError` in OpenAI's format
naming the field (`param`), e.g. `messages[0].content[1].text`.

The request schemas in serve/openapi.py describe what these checks accept.
"""

from __future__ import annotations

import json
import math
from typing import Any

from phiforge.serve import openapi

MAX_DEPTH = 16  # the deepest an accepted request nests is 5 (body > messages > [i] > content > [j])
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1  # OpenAI's seed is an int64
CHAT_ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """A request error reported to the client in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- reading a request body ------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The JSON object in `raw`; APIError(400) for anything else (invalid JSON, NaN or Infinity, nesting deeper
    than MAX_DEPTH, strings that are not valid Unicode)."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, f"the request body nests too deeply (at most {MAX_DEPTH} levels)",
                       code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity, integers of > 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {_json_type(body)}", code="invalid_json")
    _check_tree(body)
    return body


def _check_tree(body: Any) -> None:
    """Depth, finite numbers and encodable strings, everywhere in a parsed body (iteratively: no recursion)."""
    stack = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"the request body nests too deeply (at most {MAX_DEPTH} levels)",
                           param=path or None, code="invalid_json")
        if isinstance(value, dict):
            for k, v in value.items():
                _check_string(k, path or "body")
                stack.append((v, f"{path}.{k}" if path else k, depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise APIError(400, f"{path}: numbers must be finite", param=path, code="invalid_value")
        elif isinstance(value, str):
            _check_string(value, path)


def _check_string(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        raise APIError(400, f"{path}: the string is not valid Unicode (lone surrogate)", param=path,
                       code="invalid_value") from None


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---- request fields ----------------------------------------------------------------------------------------------
def int_field(body: dict[str, Any], name: str, default: Any = None, *, low: int | None = None,
              high: int | None = None) -> Any:
    """body[name] as an integer (an integral float is one too), in [low, high]; null or absent is `default`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name}: expected an integer, got {_json_type(value)}", param=name,
                       code="invalid_type")
    _in_range(name, value, low, high)
    return value


def number_field(body: dict[str, Any], name: str, default: Any = None, *, low: float | None = None,
                 high: float | None = None) -> Any:
    """body[name] as a float in [low, high]; null or absent is `default`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(400, f"{name}: expected a number, got {_json_type(value)}", param=name, code="invalid_type")
    _in_range(name, value, low, high)
    return float(value)


def _in_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if low is not None and value < low or high is not None and value > high:
        rng = f"[{low}, {high}]" if high is not None and low is not None else (
            f">= {low}" if low is not None else f"<= {high}")
        raise APIError(400, f"{name}: {value!r} is out of range (must be {rng})", param=name, code="invalid_value")


def typed_field(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """body[name], which must be a `kind` (bool, str, dict or list); null or absent is `default`."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        what = {bool: "a boolean", str: "a string", dict: "an object", list: "an array"}[kind]
        raise APIError(400, f"{name}: expected {what}, got {_json_type(value)}", param=name, code="invalid_type")
    return value


def stop_strings(body: dict[str, Any]) -> list[str]:
    """`stop`: a non-empty string or a list of up to MAX_STOPS of them."""
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > openapi.MAX_STOPS:
        raise APIError(400, f"stop: expected a non-empty string or a list of up to {openapi.MAX_STOPS} of them",
                       param="stop", code="invalid_value")
    return stop


# The fields each endpoint reads; OpenAI's others are a 400 naming them (never silently ignored).
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream", "stream_options",
           "presence_penalty", "frequency_penalty", "logit_bias", "user", "ignore_eos"}
FIELDS = {"completion": _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"},
          "chat": _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}}
NOT_SUPPORTED = {  # OpenAI's fields this server knows and does not implement -> why
    "tools": "this server does not call tools", "tool_choice": "this server does not call tools",
    "parallel_tool_calls": "this server does not call tools", "functions": "this server does not call functions",
    "function_call": "this server does not call functions", "audio": "text only", "modalities": "text only",
    "prediction": "no predicted outputs", "reasoning_effort": "not a reasoning model",
    "web_search_options": "no web search", "store": "nothing is stored", "metadata": "nothing is stored",
    "service_tier": "one tier", "min_p": "not implemented", "repetition_penalty": "not implemented",
    "safety_identifier": "not used", "prompt_cache_key": "no prompt cache", "verbosity": "not implemented",
}


def check_fields(body: dict[str, Any], kind: str) -> None:
    """Every field is one the endpoint (`kind`: completion or chat) reads; a 400 names the first other one."""
    for name in body:
        if name in FIELDS[kind]:
            continue
        if name in NOT_SUPPORTED:
            raise APIError(400, f"{name}: not supported by this server ({NOT_SUPPORTED[name]})", param=name,
                           code="unsupported_parameter")
        raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name,
                       code="unknown_parameter")


def unsupported_values(body: dict[str, Any]) -> None:
    """Fields accepted only at their neutral value (n 1, penalties 0, no logit_bias, text responses)."""
    if int_field(body, "n", 1) != 1:
        raise APIError(400, "n: only n=1 is supported", param="n", code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if number_field(body, name, 0, low=-2, high=2) != 0:
            raise APIError(400, f"{name}: not supported (must be 0)", param=name, code="unsupported_value")
    if int_field(body, "best_of", 1) != 1:
        raise APIError(400, "best_of: only 1 is supported", param="best_of", code="unsupported_value")
    if typed_field(body, "suffix", str):
        raise APIError(400, "suffix: not supported", param="suffix", code="unsupported_value")
    if typed_field(body, "logit_bias", dict):
        raise APIError(400, "logit_bias: not supported", param="logit_bias", code="unsupported_value")
    typed_field(body, "user", str)
    fmt = typed_field(body, "response_format", dict)
    if fmt is not None and (fmt.get("type") != "text" or set(fmt) != {"type"}):
        raise APIError(400, "response_format: only {\"type\": \"text\"} is supported (no JSON mode)",
                       param="response_format", code="unsupported_value")


def stream_usage(body: dict[str, Any], stream: bool) -> bool:
    """Whether the stream ends with a usage chunk (stream_options.include_usage)."""
    opts = typed_field(body, "stream_options", dict)
    if opts is None:
        return False
    if not stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options",
                       code="invalid_value")
    for k in opts:
        if k != "include_usage":
            raise APIError(400, f"stream_options.{k}: not supported (only include_usage)",
                           param=f"stream_options.{k}", code="unsupported_parameter")
    return bool(typed_field(opts, "include_usage", bool, False))


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages checked at every depth and reduced to {"role", "content": text} (text parts joined;
    a developer message is a system message). APIError(400) naming the first bad place."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: required (a non-empty list of {role, content})", param="messages",
                       code="missing" if messages is None else "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where}: expected an object, got {_json_type(m)}", param=where, code="invalid_type")
        role = m.get("role")
        if role in ("tool", "function"):
            raise APIError(400, f"{where}.role: {role} messages are not supported (this server does not call "
                                f"tools)", param=f"{where}.role", code="unsupported_value")
        if role not in CHAT_ROLES:
            raise APIError(400, f"{where}.role: must be one of {', '.join(CHAT_ROLES)}", param=f"{where}.role",
                           code="invalid_value")
        for k in m:
            if k not in ("role", "content", "name"):
                what = "not supported" if k in ("tool_calls", "function_call", "audio", "refusal") else "unknown"
                raise APIError(400, f"{where}.{k}: {what} field", param=f"{where}.{k}", code="unsupported_parameter")
        if "name" in m and not isinstance(m["name"], str):
            raise APIError(400, f"{where}.name: expected a string", param=f"{where}.name", code="invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": _message_text(m, where)})
    return out


def _message_text(m: dict[str, Any], where: str) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        got = "missing" if content is None else _json_type(content)
        raise APIError(400, f"{where}.content: expected a string or a list of text parts, got {got}",
                       param=f"{where}.content", code="invalid_type")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise APIError(400, f"{at}: expected a {{type, text}} object", param=at, code="invalid_type")
        if part.get("type") != "text":
            raise APIError(400, f"{at}.type: only text parts are supported, got {part.get('type')!r}",
                           param=f"{at}.type", code="unsupported_value")
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise APIError(400, f"{at}: a text part is {{\"type\": \"text\", \"text\": string}}", param=at,
                           code="invalid_type")
        texts.append(part["text"])
    return "".join(texts)
