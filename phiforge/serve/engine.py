"""A decoding engine for serving: many requests in one batch, each with its own sampling settings, token
logprobs, stop strings and a per-token text callback for streaming.

`phiforge.generate.generate_ids` is the simple path (one config for the whole batch). Serving needs more per
row, so this engine runs its own step loop on the same model API:
- static KV cache (`phiforge.model.KVCache`, preallocated for prompt + max new tokens);
- chunked prefill: the (left-padded) prompts go through the model `prefill_chunk` tokens at a time, so a long
  prompt never materialises a (T, T) attention matrix or (T, vocab) logits at once;
- decode one token per unfinished row per step; finished rows leave the batch and the cache;
- an optional compiled decode step (`compile=True`: torch.compile of the model's forward for one-token steps,
  dynamic shapes so a growing cache does not recompile every step). It pays off on GPU, where per-op launch
  overhead dominates a small model; on CPU the quantized matmul kernels dominate and compiling buys little
  (bench/serve.py measures it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from phiforge.generate import IncrementalDecoder, next_tokens, prepare_decoding
from phiforge.lm.sampling import Sampling, find_stop
from phiforge.model import Phi


@dataclass
class Request:
    """One prompt to complete as `sampling` says (max_new_tokens 16 unless given, OpenAI's default). `logprobs` =
    how many top alternatives to report per token (None: no logprobs; 0: only the chosen token's).
    `echo_logprobs` also scores the prompt's tokens."""

    prompt_ids: list[int]
    sampling: Sampling = Sampling(max_new_tokens=16)
    logprobs: int | None = None
    echo_logprobs: bool = False
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (eos or stop string) or "length"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # first prompt token: None


# on_text(row, new_text, token_logprob_or_None) is called as text becomes final (stop strings resolved)
TextCallback = Callable[[int, str, "TokenLogprob | None"], Any]


def _top(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The chosen token's logprob and the k most likely alternatives from one row of logprobs (V,)."""
    top = []
    if k > 0:
        vals, idx = logprobs.topk(k)
        top = list(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)


class Engine:
    """Runs batches of Requests on a (possibly quantized) Phi with a tokenizer."""

    def __init__(self, model: Phi, tokenizer: Any, *, prefill_chunk: int = 256, compile: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.eos = tokenizer.eos_token_id
        self.pad = getattr(tokenizer, "pad_token_id", None) or self.eos or 0
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype  # activations and the KV cache
        self.context = model.config.max_position_embeddings
        self.compiled = compile
        # every KV-cache call goes through the decoder: on CPU its plan runs the flat one-token path (fused int8
        # matmuls for quantized models); a compiled step traces the model's modules instead
        self.decoder = prepare_decoding(model, pack=False if compile else None)
        self.step = torch.compile(model, dynamic=True) if compile else self.decoder.step

    # ---- scoring --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int], k: int) -> list[TokenLogprob | None]:
        """Logprob of every prompt token given the ones before it (the first has none), with top-k alternatives."""
        out: list[TokenLogprob | None] = [None]
        cache = self.model.new_cache(1, len(ids))
        x = torch.tensor([ids], device=self.device)
        for s in range(0, len(ids) - 1, self.prefill_chunk):
            chunk = x[:, s:min(s + self.prefill_chunk, len(ids) - 1)]
            lp = self.decoder.step(chunk, cache)[0].float().log_softmax(-1)  # (T, V)
            for t in range(chunk.shape[1]):
                out.append(_top(lp[t], ids[s + t + 1], k))
        return out

    # ---- generation -----------------------------------------------------------------------------------------
    def validate(self, req: Request) -> None:
        """Raise ValueError (with the offending field) for a request this model cannot run."""
        if not req.prompt_ids:
            raise ValueError("prompt: the prompt is empty (it needs at least one token)")
        if len(req.prompt_ids) >= self.context:
            raise ValueError(f"prompt: {len(req.prompt_ids)} tokens leave no room in the model's context of "
                             f"{self.context} tokens")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        req.sampling.validate()

    @torch.inference_mode()
    def run(self, requests: list[Request], on_text: TextCallback | None = None) -> list[Result]:
        """Complete every request in one batch. `on_text(row, text, logprob)` streams each token's text."""
        for r in requests:
            self.validate(r)
        results = [Result() for _ in requests]
        for i, r in enumerate(requests):
            if r.echo_logprobs:
                results[i].prompt_logprobs = self.prompt_logprobs(r.prompt_ids, r.logprobs or 0)
        live = [i for i, r in enumerate(requests) if r.sampling.max_new_tokens > 0]
        if not live:
            return results
        longest = max(len(requests[i].prompt_ids) for i in live)
        # Left padding puts every row's first new token at position `longest` of the cache.
        max_len = min(self.context, longest + max(requests[i].sampling.max_new_tokens for i in live))
        n = len(live)
        ids = torch.full((n, longest), self.pad, dtype=torch.long)  # (n, T) left-padded
        mask = torch.zeros(n, longest, dtype=torch.long)
        for j, i in enumerate(live):
            p = requests[i].prompt_ids
            ids[j, longest - len(p):] = torch.tensor(p)
            mask[j, longest - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = bool((mask == 0).any())
        cache = self.model.new_cache(n, max_len)
        for s in range(0, longest, self.prefill_chunk):  # chunked prefill
            e = min(s + self.prefill_chunk, longest)
            logits = self.decoder.step(ids[:, s:e], cache, mask[:, s:e] if padded else None,
                                       last_only=True)[:, -1]  # (n, V)

        gens = {}
        for i in live:
            s = requests[i].sampling
            if s.temperature > 0:
                g = torch.Generator(device=self.device)
                g.manual_seed(s.seed if s.seed is not None else int(torch.seed() % 2**63))
                gens[i] = (s, g)  # next_tokens without `seen`: the repetition penalty is not applied here
        decoders = {i: IncrementalDecoder(self.tokenizer) for i in live}
        emitted = dict.fromkeys(live, 0)  # characters of the text already released
        holds = {i: max((len(s) for s in requests[i].sampling.stop), default=1) - 1 for i in live}
        pending: dict[int, list[TokenLogprob | None]] = {i: [] for i in live}  # logprobs of unreleased text

        def release(i: int, final: bool) -> None:
            # Release text that can no longer turn into a stop string; its tokens' logprobs go with it.
            text = decoders[i].text
            upto = len(text) if final else max(emitted[i], len(text) - holds[i])
            if upto > emitted[i] or (final and pending[i]):
                chunk = text[emitted[i]:upto]
                emitted[i] = upto
                infos = pending[i] or [None]
                pending[i] = []
                if on_text is not None:
                    for k, info in enumerate(infos):  # one callback per token, the text with the first
                        on_text(i, chunk if k == 0 else "", info)

        rows = list(live)  # request index of each row in the batch
        # Greedy rows that want no logprobs need only each step's argmax (Decoder.greedy_step: cheaper lm_head)
        argmax_only = not gens and not self.compiled and all(requests[i].logprobs is None for i in live)
        next_tok = None
        while True:
            if next_tok is not None:
                tok = next_tok
            elif not gens:
                logprobs = logits.float().log_softmax(-1)  # (n', V)
                tok = logprobs.argmax(-1)
            else:
                logprobs = logits.float().log_softmax(-1)  # (n', V)
                tok = torch.empty(len(rows), dtype=torch.long, device=self.device)
                for j, i in enumerate(rows):
                    if i in gens:
                        cfg, g = gens[i]
                        tok[j] = next_tokens(logits[j:j + 1], cfg, None, g)[0]
                    else:
                        tok[j] = logprobs[j].argmax()
            keep = []
            for j, (i, t) in enumerate(zip(rows, tok.tolist())):
                r, res = requests[i], results[i]
                res.token_ids.append(t)
                info = _top(logprobs[j], t, r.logprobs) if r.logprobs is not None else None
                if info is not None:
                    res.logprobs.append(info)
                pending[i].append(info)
                done = False
                if t == self.eos and not r.ignore_eos:
                    res.finish_reason, done = "stop", True
                else:
                    dec = decoders[i]
                    new = dec.push(t)
                    if new and r.sampling.stop:
                        start = max(0, len(dec.text) - len(new) - holds[i])
                        cut = find_stop(dec.text, r.sampling.stop, start)
                        if cut >= 0:
                            dec.text = dec.text[:cut]
                            res.finish_reason, done = "stop", True
                if not done and (len(res.token_ids) >= r.sampling.max_new_tokens or cache.length >= max_len):
                    res.finish_reason, done = "length", True
                if done:
                    decoders[i].flush()  # an incomplete UTF-8 tail becomes U+FFFD
                    text = decoders[i].text
                    cut = find_stop(text, r.sampling.stop)
                    if cut >= 0:
                        decoders[i].text = text[:cut]
                        res.finish_reason = "stop"
                    release(i, final=True)
                    res.text = decoders[i].text
                else:
                    release(i, final=False)
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch and the cache
                sel = torch.tensor(keep, device=self.device)
                cache.select(sel)
                tok = tok[sel]
                rows = [rows[j] for j in keep]
            if argmax_only:
                next_tok = self.decoder.greedy_step(tok[:, None], cache)  # (n',)
            else:
                logits = self.step(tok[:, None], cache=cache)[:, -1]  # (n', V)
        return results
