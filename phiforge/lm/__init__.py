"""Asking a model for text, in one place: the LM interface, the one Sampling type and stop cut, the model-spec
grammar and resolver, the result cache, and the backends (native phiforge, transformers, OpenAI-compatible).

    base.py             LM (loglikelihood / loglikelihood_rolling / generate_until), GenRequest, Usage
    sampling.py         Sampling, cut_at_stop
    spec.py             parse_spec -> ModelSpec, load_lm, checkpoint_dir
    cache.py            ResultCache (SQLite), CachedLM
    packed.py           the packed log-likelihood engine the torch backends share
    phiforge_backend.py PhiforgeLM;  hf.py HFLM;  openai_api.py OpenAILM (retries, budget, concurrency)
    lm_eval_adapter.py  the "phiforge" model for lm-evaluation-harness (python -m phiforge.lm.lm_eval_adapter)

Backends import torch, transformers or openai only when they are used.
"""

from phiforge.lm.base import LM, BudgetExceeded, GenRequest, Usage
from phiforge.lm.sampling import GREEDY, Sampling, cut_at_stop
from phiforge.lm.spec import ModelSpec, checkpoint_dir, load_lm, parse_spec

__all__ = ["GREEDY", "LM", "BudgetExceeded", "GenRequest", "ModelSpec", "Sampling", "Usage", "checkpoint_dir",
           "cut_at_stop", "load_lm", "parse_spec"]
