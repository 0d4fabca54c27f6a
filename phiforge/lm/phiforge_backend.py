"""The native backend: a phiforge checkpoint scored with the packed engine and generating with
`phiforge.generate` (KV cache, batched, left-padded)."""

from __future__ import annotations

import os

from phiforge.lm.base import files_fingerprint, generation_batches
from phiforge.lm.packed import TOKENS_PER_BATCH_SLOT, TorchLM
from phiforge.lm.sampling import cut_at_stop


class PhiforgeLM(TorchLM):
    """A native phiforge model + tokenizer (tokenizer API: encode, decode, eos_token_id)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16, identity: str | None = None,
                 max_batch_tokens: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens or TOKENS_PER_BATCH_SLOT * batch_size
        self.max_length = model.config.max_position_embeddings
        self.device = model.lm_head.weight.device
        self.identity = identity or f"phiforge-object-{id(model)}"

    @classmethod
    def load(cls, path: str | os.PathLike, *, dtype: str | None = None, device: str = "cpu",
             batch_size: int = 16, quant: str | None = None, group_size: int = 128) -> PhiforgeLM:
        """Load a checkpoint directory (weights + tokenizer files); `quant` "int8" / "int4" quantizes the linear
        layers while loading (phiforge.checkpoint.load_checkpoint), in the decode plan's layout."""
        from phiforge.checkpoint import load_checkpoint, resolve_checkpoint, weight_files
        from phiforge.tokenizer import load_tokenizer

        where = resolve_checkpoint(path)
        quant = None if quant in (None, "none") else quant
        model = load_checkpoint(where, dtype=dtype, device=device, quant=quant, group_size=group_size,
                                layout="decode")
        tok = load_tokenizer(where)
        ident = f"phiforge:{where.resolve()}:{files_fingerprint(list(set(weight_files(where).values())))}:{dtype}"
        if quant is not None:  # another model as far as cached results go
            from phiforge.serve.quant import QuantLinear

            kernel = next((m.kernel for m in model.modules() if isinstance(m, QuantLinear)), "")
            ident += f":{quant}:{kernel}:{group_size if kernel != 'q4' else 32}"
        return cls(model, tok, batch_size=batch_size, identity=ident)

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.tokenizer.eos_token_id

    def _packed_hidden(self, ids, pos, allowed):
        # allowed (B, T, T) bool: each segment attends within itself; positions restart per segment.
        return self.model.hidden_states(ids, attention_mask=allowed, position_ids=pos)

    def _head(self, h):
        return self.model.lm_head(h)

    def _generate(self, requests, on_result=None):
        from phiforge.generate import GenerationConfig, generate

        out: list[str] = [""] * len(requests)
        for idxs in generation_batches(requests, self.batch_size):
            s = requests[idxs[0]].sampling
            cfg = GenerationConfig(**vars(s), eos_token_id=self.tokenizer.eos_token_id)
            # Prompts longer than the context keep their most recent tokens (room left for the answer).
            keep = max(1, self.max_length - s.max_new_tokens)
            ids = [self.tok_encode(requests[i].context)[-keep:] for i in idxs]
            new_tokens = [0]

            def count(row: int, token_id: int, new_tokens=new_tokens) -> None:
                new_tokens[0] += 1

            texts = generate(self.model, self.tokenizer, [self.tok_decode(x) for x in ids], cfg, on_token=count)
            self.usage.requests += 1
            self.usage.prompt_tokens += sum(map(len, ids))
            self.usage.completion_tokens += new_tokens[0]
            for i, t in zip(idxs, texts):
                out[i] = cut_at_stop(t, s.stop)
                if on_result:
                    on_result(i, out[i])
        return out
