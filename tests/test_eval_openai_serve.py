"""Scores through an endpoint are local scores: the same tiny checkpoint scored natively and through `phiforge
serve` with the OpenAI-compatible backend gives the same log-likelihoods on every suite task's requests (built
from hub-layout repositories), contexts that end in whitespace and rolling texts included."""

from __future__ import annotations

import pytest

from tests.test_eval_hub import BBH_ROWS, MMLU_SUBJECTS, SUITE, datasets_cache, hub_root, online_hub  # noqa: F401
from tests.test_eval_lm_eval_adapter import ckpt  # noqa: F401 - the tiny checkpoint fixture
from tests.test_eval_prompts import phiforge_requests

WHITESPACE = [("Answer: ", "yes"), ("Question: is it?\nAnswer:\n", " no"), ("the cat  ", " sat"), ("x\t", "y"),
              ("", "hello world"), ("   ", "the mat")]


@pytest.fixture(scope="module")
def served(ckpt):  # noqa: F811
    from phiforge.serve.load import load_engine
    from phiforge.serve.server import BackgroundServer, Server

    server = Server(load_engine(str(ckpt)), "tiny", batch_wait_ms=5)
    with BackgroundServer(server.app) as bg:
        yield bg.url
    server.batcher.close()


def test_native_and_served_log_likelihoods_agree(ckpt, served, online_hub):  # noqa: F811
    from phiforge.lm.openai_api import OpenAILM
    from phiforge.lm.phiforge_backend import PhiforgeLM

    ll: list[tuple[str, str]] = []
    rolling: list[str] = []
    for name in SUITE:
        subjects = list(MMLU_SUBJECTS) if name == "mmlu" else list(BBH_ROWS) if name == "bbh" else None
        if name in ("humaneval", "mbpp"):
            continue  # generation only (their prompts are compared with lm-eval's in test_eval_prompts)
        rec = phiforge_requests(name, subjects=subjects)
        ll += rec.ll
        rolling += rec.rolling
    assert any(c.endswith("Answer:") for c, _ in ll) and rolling  # MC, MMLU 5-shot, SQuAD; ToxiGen's statements
    ll += WHITESPACE
    native = PhiforgeLM.load(ckpt, batch_size=4)
    remote = OpenAILM(served, "tiny", bos_text="<|endoftext|>", batch_size=8)
    a, b = native.loglikelihood(ll), remote.loglikelihood(ll)
    assert [x[0] for x in b] == pytest.approx([x[0] for x in a], abs=2e-4)
    assert native.loglikelihood_rolling(rolling) == pytest.approx(remote.loglikelihood_rolling(rolling), abs=2e-4)

    # what the split fixes: a context ending in a space used to drop the answer token from the score
    plain = OpenAILM(served, "tiny")
    n = native.loglikelihood("Answer: ", "yes")[0]
    assert plain.loglikelihood("Answer: ", "yes")[0] == pytest.approx(n, abs=2e-4)
    assert plain.loglikelihood("Answer:", " yes")[0] == pytest.approx(n, abs=2e-4)
