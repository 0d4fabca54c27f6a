"""A schema fuzz run: schemathesis generates requests from the server's own OpenAPI document (valid ones and
ones that break it) and sends them to a real uvicorn. Every answer must fit the documented responses (status,
content type, body schema, each server-sent event), no request may cause a 5xx, every schema-violating request
must be rejected with a 4xx, and a schema-valid one is accepted unless it is too long for the model's context
(which no JSON Schema can say). Bounded: a tiny model with a 64-token context and FUZZ_EXAMPLES per operation
(about half a minute on 2 cores)."""

from __future__ import annotations

import pytest
from conftest import tiny_config

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

FUZZ_EXAMPLES = 150


@schemathesis.check
def accepted_unless_too_long(ctx, response, case):
    """positive_data_acceptance, less the one rejection the schema cannot foresee."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded", f"a schema-valid request was rejected: {error}"
    return None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.model import Phi
    from phiforge.serve.load import load_engine
    from phiforge.serve.server import BackgroundServer, Server
    from phiforge.tokenizer import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat. hello world, how are you?"] * 10, 300)
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(Phi(tiny_config(vocab_size=320, max_position_embeddings=64)), ckpt, tokenizer=tok)
    server = Server(load_engine(str(ckpt)), "tiny", batch_wait_ms=1)
    with BackgroundServer(server.app) as bg:
        yield bg
    server.close()


@pytest.fixture(scope="module")
def api(served):
    return schemathesis.openapi.from_url(served.url[:-3] + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz_against_own_schema(case, served):
    # timeout: 64 prompts with 20 alternatives a token on a busy 2-core machine can take more than the default 10 s
    case.call_and_validate(base_url=served.url[:-3], excluded_checks=[positive_data_acceptance],
                           additional_checks=[accepted_unless_too_long], timeout=120)



def test_a_null_include_usage_is_documented_as_the_server_reads_it(served):
    """Found by the fuzz run: the server reads `stream_options.include_usage: null` as absent (as it reads every
    null field), so the schema must allow null there; a non-boolean is still rejected."""
    import json
    import urllib.error
    import urllib.request

    def call(path, payload=None):  # (status, parsed JSON or None for a stream)
        req = urllib.request.Request(served.url[:-3] + path, data=None if payload is None else
                                     json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                data = resp.read()
                return resp.status, json.loads(data) if path.endswith(".json") else None
        except urllib.error.HTTPError as e:
            return e.code, None

    def found(node):  # every schema the document gives include_usage
        if isinstance(node, dict):
            yield from ([node["include_usage"]] if "include_usage" in node else [])
            for v in node.values():
                yield from found(v)
        elif isinstance(node, list):
            for v in node:
                yield from found(v)

    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 2, "stream": True}
    schemas = list(found(call("/openapi.json")[1]))
    assert call("/v1/completions", {**body, "stream_options": {"include_usage": None}})[0] == 200
    assert call("/v1/completions", {**body, "stream_options": {"include_usage": "yes"}})[0] == 400
    assert schemas and all({"type": "null"} in sch.get("anyOf", []) for sch in schemas)
