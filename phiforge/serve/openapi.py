"""The server's OpenAPI document: JSON Schemas of what each endpoint accepts and answers.

The request schemas say what the server's own checks (serve/server.py) accept: a body the schema rejects is
rejected with a 4xx, and every answer fits its response schema. tests/test_serve_fuzz.py holds the two to that
with schemathesis. Some limits are the model's (`model` is this server's id, token ids below the vocabulary
size, `max_tokens` below the context); a request within the schema can still be too long for the context (400
context_length_exceeded), which no JSON Schema can say.
"""

from __future__ import annotations

from typing import Any

MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _common(model: str, context: int, max_batch: int) -> dict[str, Any]:
    """Properties the two generation endpoints share."""
    stop = {"anyOf": [{"type": "string", "minLength": 1},
                      {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOPS}]}
    return {
        "model": {"type": "string", "enum": [model], "description": "the id from /v1/models"},
        "max_tokens": _nullable({"type": "integer", "minimum": 0, "maximum": context - 1}),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "top_k": _nullable({"type": "integer", "minimum": 0, "description": "an extension, as in vLLM"}),
        "n": _nullable({"type": "integer", "enum": [1]}),
        "seed": _nullable({"type": "integer", "minimum": -(2 ** 63), "maximum": 2 ** 63 - 1}),
        "stop": _nullable(stop),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable({"type": "object", "additionalProperties": False,
                                     "properties": {"include_usage": _nullable({"type": "boolean"})}}),
        "presence_penalty": _nullable({"type": "number", "enum": [0]}),
        "frequency_penalty": _nullable({"type": "number", "enum": [0]}),
        "logit_bias": _nullable({"type": "object", "maxProperties": 0}),
        "user": _nullable({"type": "string"}),
        "ignore_eos": _nullable({"type": "boolean", "description": "an extension, as in vLLM"}),
    }


def _needs(field: str, value: Any, when: str) -> dict[str, Any]:
    """JSON Schema: `field` must be `value` whenever `when` is given (and not null)."""
    return {"if": {"required": [when], "properties": {when: {"not": {"type": "null"}}}},
            "then": {"required": [field], "properties": {field: {"const": value}}}}


def _token_ids(vocab: int, context: int) -> dict[str, Any]:
    return {"type": "array", "minItems": 1, "maxItems": context - 1,
            "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}}


def schemas(model: str, *, context: int, vocab: int, max_batch: int) -> dict[str, Any]:
    """components.schemas for a server of `model` (its context and vocabulary size; prompts per request)."""
    ids = _token_ids(vocab, context)
    prompt = {"anyOf": [{"type": "string"},
                        {"type": "array", "minItems": 1, "maxItems": max_batch, "items": {"type": "string"}},
                        ids,
                        {"type": "array", "minItems": 1, "maxItems": max_batch, "items": ids}]}
    text_part = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                 "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
    content = {"anyOf": [{"type": "string"}, {"type": "array", "items": text_part}]}
    message = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
               "properties": {"role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                              "content": content, "name": {"type": "string"}}}
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
             "properties": {k: {"type": "integer", "minimum": 0}
                            for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
    finish = {"type": "string", "enum": ["stop", "length"]}
    completion_logprobs = _nullable({
        "type": "object", "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
        "properties": {"tokens": {"type": "array", "items": {"type": "string"}},
                       "token_logprobs": {"type": "array", "items": _nullable({"type": "number"})},
                       "top_logprobs": {"type": "array", "items": _nullable(
                           {"type": "object", "additionalProperties": {"type": "number"}})},
                       "text_offset": {"type": "array", "items": {"type": "integer"}}}})
    token_lp = {"type": "object", "required": ["token", "logprob", "bytes"],
                "properties": {"token": {"type": "string"}, "logprob": {"type": "number"},
                               "bytes": {"type": "array", "items": {"type": "integer"}}}}
    chat_logprobs = _nullable({"type": "object", "required": ["content"], "properties": {"content": {
        "type": "array", "items": {**token_lp, "properties": {
            **token_lp["properties"], "top_logprobs": {"type": "array", "items": token_lp}}}}}})
    head = {"id": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"}}
    chunk_finish = _nullable(finish)
    chunk_usage = _nullable(usage)  # present (null) on every chunk with include_usage; the last one has it
    return {
        "CompletionRequest": {
            "type": "object", "required": ["model", "prompt"], "additionalProperties": False,
            "allOf": [_needs("stream", True, "stream_options"),  # and echo cannot stream:
                      {"if": {"required": ["echo"], "properties": {"echo": {"const": True}}},
                       "then": {"properties": {"stream": {"enum": [False, None]}}}}],
            "properties": {**_common(model, context, max_batch), "prompt": prompt,
                           "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}),
                           "echo": _nullable({"type": "boolean"}),
                           "best_of": _nullable({"type": "integer", "enum": [1]}),
                           "suffix": _nullable({"type": "string", "maxLength": 0})}},
        "ChatCompletionRequest": {
            "type": "object", "required": ["model", "messages"], "additionalProperties": False,
            "allOf": [_needs("stream", True, "stream_options"), _needs("logprobs", True, "top_logprobs")],
            "properties": {**_common(model, context, max_batch),
                           "messages": {"type": "array", "minItems": 1, "items": message},
                           "max_completion_tokens": _nullable({"type": "integer", "minimum": 0,
                                                               "maximum": context - 1}),
                           "logprobs": _nullable({"type": "boolean"}),
                           "top_logprobs": _nullable({"type": "integer", "minimum": 0,
                                                      "maximum": MAX_TOP_LOGPROBS}),
                           "response_format": _nullable({"type": "object", "required": ["type"],
                                                         "additionalProperties": False,
                                                         "properties": {"type": {"type": "string",
                                                                                 "enum": ["text"]}}})}},
        "Completion": {
            "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {**head, "object": {"type": "string", "enum": ["text_completion"]}, "usage": usage,
                           "choices": {"type": "array", "items": {
                               "type": "object", "required": ["index", "text", "logprobs", "finish_reason"],
                               "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                              "logprobs": completion_logprobs, "finish_reason": finish}}}}},
        "ChatCompletion": {
            "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {**head, "object": {"type": "string", "enum": ["chat.completion"]}, "usage": usage,
                           "choices": {"type": "array", "items": {
                               "type": "object", "required": ["index", "message", "logprobs", "finish_reason"],
                               "properties": {
                                   "index": {"type": "integer"}, "logprobs": chat_logprobs, "finish_reason": finish,
                                   "message": {"type": "object", "required": ["role", "content"], "properties": {
                                       "role": {"type": "string", "enum": ["assistant"]},
                                       "content": {"type": "string"}}}}}}}},
        "CompletionChunk": {
            "type": "object", "required": ["id", "object", "created", "model", "choices"],
            "properties": {**head, "object": {"type": "string", "enum": ["text_completion"]}, "usage": chunk_usage,
                           "choices": {"type": "array", "items": {
                               "type": "object", "required": ["index", "text", "logprobs", "finish_reason"],
                               "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                              "logprobs": completion_logprobs,
                                              "finish_reason": chunk_finish}}}}},
        "ChatCompletionChunk": {
            "type": "object", "required": ["id", "object", "created", "model", "choices"],
            "properties": {**head, "object": {"type": "string", "enum": ["chat.completion.chunk"]},
                           "usage": chunk_usage,
                           "choices": {"type": "array", "items": {
                               "type": "object", "required": ["index", "delta", "logprobs", "finish_reason"],
                               "properties": {
                                   "index": {"type": "integer"}, "logprobs": chat_logprobs,
                                   "finish_reason": chunk_finish,
                                   "delta": {"type": "object", "additionalProperties": False, "properties": {
                                       "role": {"type": "string", "enum": ["assistant"]},
                                       "content": {"type": "string"}}}}}}}},
        "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"],
                  "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
                                 "created": {"type": "integer"}, "owned_by": {"type": "string"}}},
        "ModelList": {"type": "object", "required": ["object", "data"],
                      "properties": {"object": {"type": "string", "enum": ["list"]},
                                     "data": {"type": "array", "items": _ref("Model")}}},
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": _nullable({"type": "string"}), "code": _nullable({"type": "string"})}}}},
    }


def json_body(name: str) -> dict[str, Any]:
    """`openapi_extra` declaring a required JSON request body of schema `name` (the handler reads it itself)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(name)}}}}


def sse_event(chunk: str) -> dict[str, Any]:
    """One server-sent event of a stream of `chunk`s: `data:` is a chunk, an in-band error (the response had
    started when generation failed), or the closing `[DONE]`."""
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"type": "string", "const": "[DONE]"},
        {"type": "string", "not": {"const": "[DONE]"}, "contentMediaType": "application/json",
         "contentSchema": {"anyOf": [_ref(chunk), _ref("Error")]}}]}}}


def responses(ok: str | None, *, stream: str | None = None, errors: tuple[int, ...] = ()) -> dict[int | str, Any]:
    """The `responses` of a route: 200 with schema `ok` (or, when the request streams, server-sent events of
    `stream` chunks), and the error statuses it can answer, each with the Error body."""
    out: dict[int | str, Any] = {}
    if ok is not None:
        content: dict[str, Any] = {"application/json": {"schema": _ref(ok)}}
        if stream:
            content["text/event-stream"] = {"schema": sse_event(stream)}
        out[200] = {"description": "OK", "content": content}
    why = {400: "invalid request", 401: "missing or wrong API key", 404: "no such model", 405: "method not allowed",
           413: "request body too large", 500: "internal error"}
    for code in errors:
        out[code] = {"description": why[code], "content": {"application/json": {"schema": _ref("Error")}}}
    return out
