"""Serving a transformers causal LM (SmolLM2, any HF directory or GGUF file) with the same Engine as a Phi.

The Engine's loop needs a few KV-cache calls (`new_cache`, `step`, `greedy_step`, `cache.select`); `HFDecoder`
provides them over a transformers model's DynamicCache, with the attention mask and position ids a left-padded
batch needs. `HFTokenizer` gives the transformers tokenizer the small interface the engine, the chat templates
and the server use (encode/decode without special tokens added, id_to_token, eos/bos, chat_template); it calls
the Rust tokenizer directly, whose calls never mutate it, so tokenizing on the server's threads while the model
worker decodes is safe.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from phiforge.serve.engine import Engine


class HFTokenizer:
    """A transformers fast tokenizer as the engine and server use a tokenizer."""

    def __init__(self, hf: Any) -> None:
        self.hf, self.backend = hf, hf.backend_tokenizer
        self.eos_token, self.eos_token_id = hf.eos_token, hf.eos_token_id
        self.bos_token = hf.bos_token if hf.bos_token is not None else hf.eos_token
        self.pad_token_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
        self.chat_template = getattr(hf, "chat_template", None)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added (a chat template writes its own)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))


class HFCache:
    """A transformers DynamicCache plus the batch's attention mask so far (left padding stays masked)."""

    def __init__(self, past: Any, max_len: int) -> None:
        self.past, self.max_len = past, max_len
        self.mask: torch.Tensor | None = None  # (B, length) 1 = real token
        self.length = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows`."""
        self.past.batch_select_indices(rows)
        if self.mask is not None:
            self.mask = self.mask[rows]


class HFDecoder:
    """The Engine's KV-cache calls on a transformers causal LM."""

    backend = "transformers"

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        cfg = model.config
        self.device = next(model.parameters()).device
        self.context = int(getattr(cfg, "max_position_embeddings", None) or 2048)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or ())  # instruct models stop on several
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache` (the old name still works there, with a warning), and
        # 4.48 renamed `num_logits_to_keep` to `logits_to_keep`
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    def new_cache(self, batch_size: int, max_len: int) -> HFCache:
        from transformers import DynamicCache

        return HFCache(DynamicCache(), max_len)

    def step(self, input_ids: torch.Tensor, cache: HFCache, attention_mask: torch.Tensor | None = None,
             last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) of `input_ids` (B, T) after the cached positions, or (B, 1, V) when `last_only`."""
        B, T = input_ids.shape
        new = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.long,
                                                                            device=input_ids.device)
        full = new if cache.mask is None else torch.cat([cache.mask, new.to(cache.mask.dtype)], 1)
        # positions count real tokens only, so a left-padded row starts at 0 like an unpadded one
        pos = (full.cumsum(-1) - 1).clamp(min=0)[:, -T:]
        kw = {self._cache_kw: cache.past}
        if self._keep_kw and last_only:  # only the last position's logits: no (T, vocab) matrix for a prompt
            kw[self._keep_kw] = 1
        out = self.model(input_ids=input_ids, attention_mask=full, position_ids=pos, use_cache=True, **kw)
        cache.mask, cache.length = full, cache.length + T
        return out.logits[:, -1:] if last_only else out.logits

    def greedy_step(self, input_ids: torch.Tensor, cache: HFCache) -> torch.Tensor:
        return self.step(input_ids, cache, last_only=True)[:, -1].float().argmax(-1)


def hf_engine(model: Any, tokenizer: Any, *, prefill_chunk: int = 256) -> Engine:
    """An Engine over a transformers causal LM and its (transformers) tokenizer."""
    tok = tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer(tokenizer)
    return Engine(model, tok, prefill_chunk=prefill_chunk, decoder=HFDecoder(model))
