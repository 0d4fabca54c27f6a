"""Decoder: what generation and serving hold to run a model's KV-cache calls, on a DecodePlan where it serves.

A plan serves a one-token step on an unpadded cache without autograd; every other call (prefill, padding,
training) is the model's own forward, so routing every cached call through the decoder changes nothing but
speed. A plan copies weights, so `Decoder.build` reuses the plan it last built for the same model (kept per
model, weakly: it neither keeps the model alive nor lives past it) while that plan is still fresh.

Freshness costs ~15 us a layer in Python (10 % of a 100M int8 model's step), so it is checked once per KV cache,
at the cache's first planned step: a cache holds the keys and values of one set of weights, and changing
weights in the middle of a generation would mix two models whichever path ran. A stale plan (training,
load_state_dict, `.to`, a module swapped in) is released and the model's modules run from then on.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from phiforge.decode.linear import default_kernel
from phiforge.decode.plan import DecodePlan

if TYPE_CHECKING:
    from phiforge.model import KVCache, Phi

_PLANS: weakref.WeakKeyDictionary[Phi, DecodePlan] = weakref.WeakKeyDictionary()  # the last plan built per model


def plan_of(model: Phi) -> DecodePlan | None:
    """The plan `Decoder.build` last made for `model` and still keeps, if any (stale or not)."""
    return _PLANS.get(model)


def release(model: Phi) -> None:
    """Free the weight copies of `model`'s plan; decoders holding it fall back to the model's modules."""
    plan = _PLANS.pop(model, None)
    if plan is not None:
        plan.release()


class Decoder:
    """A model's KV-cache calls: `step` (logits) and `greedy_step` (argmax tokens), on `plan` where it serves.

    `Decoder(model)` has no plan: it is the model itself. `Decoder.build(model)` makes (or reuses) one.
    """

    def __init__(self, model: Phi, plan: DecodePlan | None = None, *, why: str = "") -> None:
        self.model, self.plan = model, plan
        # why the modules run (no plan), or a note on the plan's choice: `describe` says it, nothing is silent
        self.why = why
        self._checked: weakref.ref[KVCache] | None = None  # the cache the plan was last found fresh for

    @classmethod
    def build(cls, model: Phi, kernel: str | None = None, *, why: str = "") -> Decoder:
        """A decoder with a fresh plan for `model` (none on the meta device: nothing to copy).

        `kernel` overrides the choice for the weights' device/dtype ("mkldnn", "t", "plain"; see
        decode/linear.py). The plan costs extra memory up to the linear weights (none for "plain", none for
        models quantized by serve/quant or loaded in the decode layout: `DecodePlan.copy_bytes` says how much)."""
        weight = model.model.embed_tokens.weight
        if weight.device.type == "meta":
            return cls(model, why="the model is on the meta device")
        kernel = kernel or default_kernel(weight)
        plan = _PLANS.get(model)
        if plan is None or plan.kernel != kernel or not plan.fresh():
            release(model)  # free the stale copies before making new ones
            with torch.no_grad():
                plan = _PLANS[model] = DecodePlan(model, kernel)
        return cls(model, plan, why=why)

    def describe(self) -> str:
        """One line: the path a decode step takes and its kernels, or why the model's modules run."""
        if self.plan is not None and not self.plan.released:
            return self.plan.describe() + (f" ({self.why})" if self.why else "")
        return f"module path: {self.why or 'no decode plan'}"

    def step(self, input_ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None,
             last_only: bool = False) -> torch.Tensor:
        """`model(input_ids, attention_mask, cache=cache, last_only=last_only)`: logits (B, T, V), or (B, 1, V)
        when `last_only` or for a one-token step the plan serves (and a prompt's, `last_only`, where its layers
        run natively: DecodePlan.prefill)."""
        T = input_ids.shape[1]
        prefill = T > 1 and last_only and self.plan is not None and self.plan.native is not None
        if attention_mask is None and (T == 1 or prefill) and self._serves(input_ids, cache):
            return self.plan.step(input_ids, cache) if T == 1 else self.plan.prefill(input_ids, cache)
        return self.model(input_ids, attention_mask=attention_mask, cache=cache, last_only=last_only)

    def greedy_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step (input_ids (B, 1), appended to `cache`) that returns only the greedy next token (B,):
        the argmax of `step`'s fp32 logits, computed faster where the plan serves (ArgmaxScreen)."""
        if input_ids.shape[1] == 1 and self._serves(input_ids, cache):
            return self.plan.greedy_step(input_ids, cache)
        return self.model(input_ids, cache=cache)[:, -1].float().argmax(-1)

    def release(self) -> None:
        """Drop the plan and free its weight copies (for every decoder sharing it); the model's modules run."""
        if self.plan is not None:
            if _PLANS.get(self.model) is self.plan:
                del _PLANS[self.model]
            self.plan.release()
            self.plan = None
            self.why = "the decode plan was released (its weights changed)"

    def _serves(self, input_ids: torch.Tensor, cache: KVCache) -> bool:
        """Whether the plan can run this call's tokens on an unpadded cache (the caller checks their count)."""
        plan = self.plan
        if plan is None or cache.key_mask is not None or self.model.training or torch.is_grad_enabled():
            return False
        if plan.released or self._checked is None or self._checked() is not cache:
            if not plan.fresh():  # released, or weights changed since the plan was built: its copies are stale
                self.release()
                return False
            self._checked = weakref.ref(cache)
        if cache.length + input_ids.shape[1] > min(cache.max_len, self.model.config.max_position_embeddings):
            raise ValueError(f"sequence of {cache.length + input_ids.shape[1]} tokens exceeds the context of "
                             f"{self.model.config.max_position_embeddings} or the KV cache ({cache.max_len})")
        return True
