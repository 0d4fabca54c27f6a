"""The OpenAI-compatible backend against a tiny fake completions server on 127.0.0.1 (stdlib http.server)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest


def fake_logprobs(text: str) -> dict:
    """One 'token' per character; logprob = -(ord(c) % 7) / 10; the top token is always 'a'."""
    toks = list(text)
    lps = [None] + [-(ord(c) % 7) / 10 for c in toks[1:]]
    return {"tokens": toks, "token_logprobs": lps, "text_offset": list(range(len(toks))),
            "top_logprobs": [None] + [{"a": -0.01} for _ in toks[1:]]}


class Handler(BaseHTTPRequestHandler):
    with_logprobs = True
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.seen.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        for i, p in enumerate(prompts):
            if body.get("echo"):
                choices.append({"index": i, "text": p,
                                "logprobs": fake_logprobs(p) if Handler.with_logprobs else None})
            else:
                text = f" answer to {len(p)} chars.\n\nQ: more"
                choices.append({"index": i, "text": text})
        data = json.dumps({"choices": choices[::-1]}).encode()  # out of order on purpose: index decides
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    Handler.with_logprobs = True
    Handler.seen = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_openai_loglikelihood_sums_continuation_tokens(server):
    from phiforge.lm.openai_api import OpenAILM

    lm = OpenAILM(server, "fake")
    res = lm.loglikelihood([("ctx", " ab"), ("hello", " aa")])
    exp0 = sum(-(ord(c) % 7) / 10 for c in " ab")
    assert res[0][0] == pytest.approx(exp0)
    assert res[0][1] is False  # ' ' and 'b' are not the top token
    assert res[1][0] == pytest.approx(sum(-(ord(c) % 7) / 10 for c in " aa"))
    assert Handler.seen[0]["echo"] is True and Handler.seen[0]["logprobs"] == 1
    rolled = lm.loglikelihood_rolling("xyz")
    assert rolled == pytest.approx(sum(-(ord(c) % 7) / 10 for c in "yz"))


def test_openai_generation_cuts_at_stop(server):
    from phiforge.lm import GenRequest, Sampling
    from phiforge.lm.openai_api import OpenAILM

    lm = OpenAILM(server, "fake")
    s = Sampling(max_new_tokens=32, stop=("\n\n",))
    outs = lm.generate_until([GenRequest("Q: 1\nA:", s), GenRequest("longer prompt", s)])
    assert outs == [" answer to 7 chars.", " answer to 13 chars."]
    assert Handler.seen[-1]["stop"] == ["\n\n"] and Handler.seen[-1]["max_tokens"] == 32


def test_openai_without_prompt_logprobs_is_a_clear_error(server):
    from phiforge.errors import PhiforgeError
    from phiforge.lm.openai_api import OpenAILM

    Handler.with_logprobs = False
    with pytest.raises(PhiforgeError, match="does not return prompt logprobs"):
        OpenAILM(server, "fake").loglikelihood("a", " b")


def test_openai_unreachable_is_a_clear_error():
    from phiforge.errors import PhiforgeError
    from phiforge.lm.openai_api import OpenAILM

    with pytest.raises(PhiforgeError, match="cannot connect"):
        OpenAILM("http://127.0.0.1:9/v1", "fake", timeout=2).generate_until("hi")
