"""phiforge inside lm-evaluation-harness: lm-eval's own tasks on phiforge's packed, cached scorer.

    python -m phiforge.lm.lm_eval_adapter --model phiforge --model_args pretrained=DIR --tasks arc_easy,hellaswag

runs `lm_eval` (same flags) with a model named "phiforge" registered. lm-eval 0.4 finds models only in its own
registry (it has no plugin entry points), so the model exists once this module is imported: in Python,

    import phiforge.lm.lm_eval_adapter  # registers "phiforge"
    lm_eval.simple_evaluate(model="phiforge", model_args="pretrained=DIR", tasks=["arc_easy"])

model_args: pretrained (any phiforge model spec: a checkpoint directory, a transformers directory, a .gguf file,
smollm2, a hub id), backend (auto, phiforge, hf), dtype (fp32, bf16, fp16), device, batch_size (as in
`phiforge eval`: a budget of batch_size x 256 tokens per forward pass), cache (a SQLite file: phiforge's result
cache, so a repeated or interrupted run answers from it). Log-likelihoods are split and truncated as lm-eval's
`hf` model does (tests/test_eval_lm_eval_adapter.py checks they are identical); generation is greedy unless the
task asks to sample, cut at the task's `until` strings.
"""

from __future__ import annotations

import sys
from typing import Any

import lm_eval.models  # noqa: F401 - the builtin models first: get_model imports them only into an empty registry
from lm_eval.api.model import LM as HarnessLM
from lm_eval.api.registry import register_model

from phiforge.lm import GenRequest, Sampling, load_lm

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default max_gen_toks


@register_model("phiforge")
class PhiforgeHarnessLM(HarnessLM):
    """An lm-eval model backed by a phiforge LM (`phiforge.lm.load_lm`)."""

    def __init__(self, pretrained: str, backend: str = "auto", dtype: str | None = None, device: str = "cpu",
                 batch_size: int | str = 16, cache: str | None = None, **ignored: Any) -> None:
        super().__init__()
        bs = int(batch_size) if str(batch_size).isdigit() else 16  # "auto": phiforge batches by tokens anyway
        lm = load_lm(str(pretrained), backend=backend, dtype=dtype, device=device or "cpu", batch_size=bs)
        if cache:
            from phiforge.lm.cache import CachedLM, ResultCache

            lm = CachedLM(lm, ResultCache(cache), desc="lm-eval")
        self.lm = lm

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [(float(ll), bool(g)) for ll, g in self.lm.loglikelihood([tuple(r.args) for r in requests])]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [float(x) for x in self.lm.loglikelihood_rolling([r.args[0] for r in requests])]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self.lm.generate_until([GenRequest(r.args[0], sampling_of(r.args[1])) for r in requests])


def sampling_of(gen_kwargs: dict[str, Any]) -> Sampling:
    """lm-eval's generation kwargs (until, max_gen_toks, do_sample, temperature, top_p, top_k) as a Sampling."""
    kw = dict(gen_kwargs or {})
    until = kw.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    temperature = float(kw.get("temperature", 0.0) or 0.0) if kw.get("do_sample", False) else 0.0
    return Sampling(max_new_tokens=int(kw.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), stop=until,
                    temperature=temperature, top_p=kw.get("top_p") if temperature else None,
                    top_k=kw.get("top_k") if temperature else None)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the "phiforge" model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
