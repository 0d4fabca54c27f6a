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

Rows are independent: with `run(..., isolate=True)` (what the server's batcher uses) a row whose request cannot
run (bad settings, a sampler or callback that raises) fails alone, with `Result.error` set, and a row whose
`Request.cancel` event is set (its client went away) leaves the batch at the next step. Only a failure of the
batched model step itself concerns every row.

The model is a phiforge `Phi` by default; any other model comes with a `decoder` (serve/hf_engine.py wraps a
transformers causal LM) that provides the same KV-cache calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from phiforge.generate import IncrementalDecoder, next_tokens, prepare_decoding
from phiforge.lm.sampling import Sampling, find_stop

SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts
# Sampling divides the logits by the temperature: below this, fp32 logits overflow to inf (and the softmax to
# NaN), while the distribution is the greedy one already; such temperatures sample at this one.
MIN_TEMPERATURE = 1e-6


@dataclass
class Request:
    """One prompt to complete as `sampling` says (max_new_tokens 16 unless given, OpenAI's default). `logprobs` =
    how many top alternatives to report per token (None: no logprobs; 0: only the chosen token's).
    `echo_logprobs` also scores the prompt's tokens. Setting `cancel` stops the request at the next step."""

    prompt_ids: list[int]
    sampling: Sampling = Sampling(max_new_tokens=16)
    logprobs: int | None = None
    echo_logprobs: bool = False
    ignore_eos: bool = False
    cancel: threading.Event | None = None

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (eos or stop string), "length", "cancelled" or "error"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # first prompt token: None
    error: Exception | None = None  # why this row failed (run(..., isolate=True) only)


# on_text(row, new_text, token_logprob_or_None) is called as text becomes final (stop strings resolved)
TextCallback = Callable[[int, str, "TokenLogprob | None"], Any]


LOGPROB_FLOOR = -9999.0  # reported for an impossible token (-inf is not JSON), as vLLM does


def _top(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The chosen token's logprob and the k most likely alternatives from one row of logprobs (V,)."""
    logprobs = logprobs.clamp(min=LOGPROB_FLOOR)
    top = []
    if k > 0:
        vals, idx = logprobs.topk(min(k, logprobs.shape[-1]))
        top = list(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)


class Engine:
    """Runs batches of Requests on a (possibly quantized) Phi with a tokenizer, or on any model a `decoder` steps
    (it then gives `backend`, `context`, `vocab_size`, `eos_ids`, `new_cache`, `step` and `greedy_step`)."""

    def __init__(self, model: Any, tokenizer: Any, *, prefill_chunk: int = 256, compile: bool = False,
                 decoder: Any = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.eos = tokenizer.eos_token_id
        self.pad = getattr(tokenizer, "pad_token_id", None) or self.eos or 0
        self.compiled = compile
        if decoder is None:  # a phiforge Phi
            self.backend = "phiforge"
            self.device = model.model.embed_tokens.weight.device
            self.dtype = model.model.embed_tokens.weight.dtype  # activations (the KV cache: model.new_cache)
            self.context = model.config.max_position_embeddings
            self.vocab_size = model.config.vocab_size
            self.eos_ids = {self.eos}
            self.new_cache = model.new_cache
            # every KV-cache call goes through the decoder: on CPU its plan runs the flat one-token path (fused
            # int8 matmuls for quantized models); a compiled step traces the model's modules instead
            self.decoder = prepare_decoding(model, pack=False if compile else None)
            self.step = torch.compile(model, dynamic=True) if compile else self.decoder.step
        else:
            self.backend, self.device, self.context = decoder.backend, decoder.device, decoder.context
            self.vocab_size, self.eos_ids = decoder.vocab_size, {self.eos} | set(decoder.eos_ids)
            self.new_cache, self.decoder, self.step = decoder.new_cache, decoder, decoder.step

    # ---- scoring --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int], k: int) -> list[TokenLogprob | None]:
        """Logprob of every prompt token given the ones before it (the first has none), with top-k alternatives."""
        out: list[TokenLogprob | None] = [None]
        cache = self.new_cache(1, len(ids))
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
        if any(not 0 <= t < self.vocab_size for t in req.prompt_ids):
            raise ValueError(f"prompt: token ids must be in [0, {self.vocab_size})")
        s = req.sampling
        if s.seed is not None and not SEED_RANGE[0] <= s.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed: {s.seed} is out of range [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        if req.logprobs is not None and req.logprobs < 0:
            raise ValueError(f"logprobs: must be >= 0, got {req.logprobs}")
        s.validate()

    def _seeded(self, s: Sampling) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(s.seed if s.seed is not None else int(torch.seed() % 2**63))
        return g

    @torch.inference_mode()
    def run(self, requests: list[Request], on_text: TextCallback | None = None, *,
            isolate: bool = False) -> list[Result]:
        """Complete every request in one batch. `on_text(row, text, logprob)` streams each token's text.

        A request that cannot run raises (ValueError for bad settings) unless `isolate`: then its row alone
        fails (`Result.error`, finish_reason "error") and the others go on. A cancelled request (`Request.cancel`
        set) leaves the batch at the next step with finish_reason "cancelled"."""
        if not isolate:
            for r in requests:
                self.validate(r)
        results = [Result() for _ in requests]
        gens: dict[int, tuple[Sampling, torch.Generator]] = {}
        live = []

        def fail(i: int, e: Exception) -> None:
            if not isolate:
                raise e
            results[i].error, results[i].finish_reason = e, "error"

        for i, r in enumerate(requests):
            try:
                self.validate(r)
                if r.cancelled:
                    results[i].finish_reason = "cancelled"
                    continue
                if r.echo_logprobs:
                    results[i].prompt_logprobs = self.prompt_logprobs(r.prompt_ids, r.logprobs or 0)
                if r.sampling.max_new_tokens > 0:
                    if r.sampling.temperature > 0:
                        # next_tokens without `seen`: the repetition penalty is not applied here
                        s = replace(r.sampling, temperature=max(r.sampling.temperature, MIN_TEMPERATURE))
                        gens[i] = (s, self._seeded(s))
                    live.append(i)
            except Exception as e:  # noqa: BLE001 - this row's own failure
                fail(i, e)
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
        cache = self.new_cache(n, max_len)
        for s in range(0, longest, self.prefill_chunk):  # chunked prefill
            if all(requests[i].cancelled for i in live):  # every client left: stop before the next chunk
                for i in live:
                    results[i].finish_reason = "cancelled"
                return results
            e = min(s + self.prefill_chunk, longest)
            logits = self.decoder.step(ids[:, s:e], cache, mask[:, s:e] if padded else None,
                                       last_only=True)[:, -1]  # (n, V)

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

        def advance(j: int, i: int, t: int, logprobs: torch.Tensor | None) -> bool:
            """Take token t for row j (request i); True when the request is done."""
            r, res = requests[i], results[i]
            res.token_ids.append(t)
            info = _top(logprobs[j], t, r.logprobs) if r.logprobs is not None else None
            if info is not None:
                res.logprobs.append(info)
            pending[i].append(info)
            done = False
            if t in self.eos_ids and not r.ignore_eos:
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
            return done

        rows = list(live)  # request index of each row in the batch
        # Greedy rows that want no logprobs need only each step's argmax (Decoder.greedy_step: cheaper lm_head)
        argmax_only = not gens and not self.compiled and all(requests[i].logprobs is None for i in live)
        next_tok = None
        while True:
            logprobs = None
            if next_tok is not None:
                tok = next_tok
            else:
                logprobs = logits.float().log_softmax(-1)  # (n', V)
                tok = logprobs.argmax(-1)
            toks = tok.tolist()
            keep = []
            for j, i in enumerate(rows):
                if requests[i].cancelled:
                    results[i].finish_reason = "cancelled"
                    continue
                try:
                    if i in gens:
                        cfg, g = gens[i]
                        toks[j] = int(next_tokens(logits[j:j + 1], cfg, None, g)[0])
                    if not advance(j, i, toks[j], logprobs):
                        keep.append(j)
                except Exception as e:  # noqa: BLE001 - this row's own failure: it leaves the batch
                    fail(i, e)
            if not keep:
                break
            tok = torch.tensor(toks, device=self.device)
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
