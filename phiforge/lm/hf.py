"""The transformers backend: any Hugging Face causal LM (a directory, a .gguf file, an alias such as `smollm2`,
or a hub id), scored with the packed engine and generating with `model.generate`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from phiforge.errors import PhiforgeError
from phiforge.lm.base import files_fingerprint, generation_batches
from phiforge.lm.packed import TOKENS_PER_BATCH_SLOT, TorchLM
from phiforge.lm.sampling import cut_at_stop
from phiforge.lm.spec import ModelSpec, hf_location


class HFLM(TorchLM):
    """A transformers causal LM (directory, .gguf file, alias or hub id).

    With `chat` (None: whenever the tokenizer has a chat template) each generation prompt is sent as one user
    turn of the model's chat template, after an optional `system` message: what instruct models (SmolLM2 as a
    teacher) expect. Log-likelihoods always score the raw text.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, identity: str | None = None,
                 max_length: int | None = None, max_batch_tokens: int | None = None, chat: bool | None = False,
                 system: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        self.system = system
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens or TOKENS_PER_BATCH_SLOT * batch_size
        self.device = next(model.parameters()).device
        self.max_length = max_length or int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.identity = identity or f"hf-object-{id(model)}"

    @classmethod
    def load(cls, spec: str | os.PathLike | ModelSpec, *, dtype: str | None = None, device: str = "cpu",
             batch_size: int = 16, chat: bool | None = False, system: str | None = None) -> HFLM:
        """Load a model spec (directory, .gguf file, alias or hub id) through transformers."""
        from phiforge.checkpoint import parse_dtype

        where, gguf = hf_location(spec)
        model, tok = load_hf_causal_lm(spec, dtype=parse_dtype(dtype), device=device)
        p = Path(where)
        if gguf:
            fp = files_fingerprint([p / gguf])
        elif p.is_dir():
            fp = files_fingerprint([f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".json")])
        else:
            fp = "hub"
        return cls(model, tok, batch_size=batch_size, identity=f"hf:{where}:{gguf}:{fp}:{dtype}", chat=chat,
                   system=system)

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def _split_head(self) -> bool:
        """Whether logits are exactly lm_head(decoder output), so the head can run on selected positions only
        (models that scale or soft-cap their logits run whole)."""
        cfg = self.model.config
        return (getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None
                and self.model.get_output_embeddings() is not None
                and hasattr(self.model, self.model.base_model_prefix))

    def _packed_hidden(self, ids, pos, allowed):
        import torch

        dtype = next(self.model.parameters()).dtype
        # A 4D mask reaches the attention functions as is (transformers' masking_utils): additive float, 0 where
        # a query may attend and the dtype's minimum elsewhere, which both the eager and the SDPA paths accept.
        mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        mask = mask[:, None]  # (B, 1, T, T)
        if self._split_head():
            body = getattr(self.model, self.model.base_model_prefix)
            return body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits

    def _head(self, h):
        return self.model.get_output_embeddings()(h) if self._split_head() else h

    def _render(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _generate(self, requests, on_result=None):
        import torch

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out: list[str] = [""] * len(requests)
        for idxs in generation_batches(requests, self.batch_size):
            s = requests[idxs[0]].sampling
            keep = max(1, self.max_length - s.max_new_tokens)
            encs = [self.tok_encode(self._render(requests[i].context))[-keep:] for i in idxs]
            T = max(len(e) for e in encs)
            ids = torch.full((len(encs), T), pad, dtype=torch.long)
            mask = torch.zeros(len(encs), T, dtype=torch.long)
            for b, e in enumerate(encs):
                ids[b, T - len(e):] = torch.tensor(e)
                mask[b, T - len(e):] = 1
            kwargs: dict[str, Any] = {"do_sample": s.temperature > 0}
            if kwargs["do_sample"]:
                kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
                if s.seed is not None:
                    torch.manual_seed(s.seed)
            if s.repetition_penalty != 1.0:
                kwargs["repetition_penalty"] = s.repetition_penalty
            if s.stop:
                kwargs.update(stop_strings=list(s.stop), tokenizer=tok)
            with torch.inference_mode():
                gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          max_new_tokens=s.max_new_tokens, pad_token_id=pad, **kwargs)
            self.usage.requests += 1
            self.usage.prompt_tokens += sum(map(len, encs))
            for b, i in enumerate(idxs):
                new = gen[b, T:].tolist()
                # a row's own tokens end at its eos (the padding after it is not the model's output)
                self.usage.completion_tokens += next((k for k, t in enumerate(new) if t == tok.eos_token_id),
                                                     len(new))
                out[i] = cut_at_stop(self.tok_decode(new), s.stop)
                if on_result:
                    on_result(i, out[i])
        return out


def load_hf_causal_lm(spec: str | os.PathLike | ModelSpec, *, dtype: Any = None, device: str = "cpu"):
    """(model, tokenizer) from transformers for a local directory, a .gguf file, an alias or a hub id.

    A GGUF file (and so `smollm2`) goes through phiforge's GGUF loader (`phiforge.lm.gguf_load`): parsed once,
    dequantized with vectorised ops, the model built without random init, the tokenizer built directly; the same
    weights, config and tokenizer as transformers' own GGUF load, in a fraction of the time. What that loader does
    not know goes to transformers' path; `model.phiforge_gguf_load` says which loader built what."""
    import torch

    where, gguf = hf_location(spec)
    try:
        if gguf:
            from phiforge.lm.gguf_load import load_gguf_causal_lm

            model, tok = load_gguf_causal_lm(Path(where) / gguf, dtype=dtype or torch.float32)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(where)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32)
    except OSError as e:
        raise PhiforgeError(f"{spec}: cannot load with transformers ({e})") from None
    return model.to(device).eval(), tok
