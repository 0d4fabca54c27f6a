"""The model interface every task talks to, and its backends.

One interface of three methods (each takes one request or a list of them; lists are batched):

    loglikelihood(context, continuation)            -> (log P(continuation | context), is_greedy)
    loglikelihood_rolling(text)                      -> log P(text) (from the start-of-text token)
    generate_until(context, stop, max_tokens, sampling) -> completion text, cut before the first stop string

Backends:
- `PhiforgeLM`: a native phiforge checkpoint (KV cache of phiforge.model).
- `HFLM`: any Hugging Face causal LM through transformers: a directory, a `.gguf` file (`gguf_file=`), an
  alias such as `smollm2`, or a hub id.
- `OpenAILM`: any OpenAI-compatible `/v1/completions` endpoint: generation always; log-likelihood when the
  server returns prompt logprobs (`echo=true, logprobs=1`).

Tokenization follows lm-evaluation-harness so scores are identical: trailing spaces of the context move to the
continuation, the pair is encoded as one string and split at the length of the context's own encoding, and an
empty context is replaced by the start-of-text token.

Speed (the torch backends): requests are grouped by context, each context runs once with a KV cache, and its
cache rows are repeated for all of its continuations (a multiple-choice item costs one context plus its
answers, not n_choices full sequences); groups are sorted longest first and batched.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from phiforge.errors import PhiforgeError

OnResult = Callable[[int, Any], None]  # (request index, result): called as soon as a result is ready


@dataclass(frozen=True)
class Sampling:
    """How `generate_until` picks tokens: temperature 0 = greedy. `seed` makes sampled runs repeatable."""

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None


GREEDY = Sampling()


@dataclass(frozen=True)
class GenRequest:
    context: str
    stop: tuple[str, ...] = ()
    max_tokens: int = 256
    sampling: Sampling = GREEDY

    def key(self) -> dict:
        return {"context": self.context, "stop": list(self.stop), "max_tokens": self.max_tokens,
                "sampling": asdict(self.sampling)}


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


class LM:
    """Base class: the three public methods accept one request or a list; subclasses implement the list forms.

    `identity` names the model for the result cache (path + weight file sizes/mtimes, or endpoint + model).
    """

    identity: str = "lm"
    batch_size: int = 16

    # ---- public interface --------------------------------------------------------------------------------------
    def loglikelihood(self, context: str | Sequence[tuple[str, str]], continuation: str | None = None,
                      on_result: OnResult | None = None):
        """log P(continuation | context) and whether it is the greedy continuation.

        `loglikelihood(ctx, cont)` -> (float, bool); `loglikelihood([(ctx, cont), ...])` -> list of them.
        """
        if isinstance(context, str):
            return self._loglikelihood([(context, continuation or "")])[0]
        return self._loglikelihood(list(context), on_result)

    def loglikelihood_rolling(self, text: str | Sequence[str], on_result: OnResult | None = None):
        """Total log-probability of a text (str -> float; list -> list of floats)."""
        if isinstance(text, str):
            return self._loglikelihood_rolling([text])[0]
        return self._loglikelihood_rolling(list(text), on_result)

    def generate_until(self, context: str | Sequence[GenRequest], stop: Sequence[str] = (), max_tokens: int = 256,
                       sampling: Sampling = GREEDY, on_result: OnResult | None = None):
        """Completion of `context` cut before the first of `stop` (str -> str; list of GenRequest -> list)."""
        if isinstance(context, str):
            return self._generate([GenRequest(context, tuple(stop), max_tokens, sampling)])[0]
        return self._generate(list(context), on_result)

    # ---- backend hooks -----------------------------------------------------------------------------------------
    def _loglikelihood(self, requests: list[tuple[str, str]], on_result: OnResult | None = None
                       ) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def _loglikelihood_rolling(self, texts: list[str], on_result: OnResult | None = None) -> list[float]:
        raise NotImplementedError

    def _generate(self, requests: list[GenRequest], on_result: OnResult | None = None) -> list[str]:
        raise NotImplementedError


def files_fingerprint(paths: Sequence[Path]) -> str:
    """A short hash of (name, size, mtime) of files: changes when weights change, cheap to compute."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ---- torch engine shared by the native and transformers backends -------------------------------------------
class TorchLM(LM):
    """Log-likelihood engine on token ids; subclasses provide tokenization and two forward primitives:

    `_prefill(ids (B, T) left-padded, mask (B, T)) -> (last logits (B, V), state)` and
    `_extend(state, rows (N,), ids (N, Tc)) -> logits (N, Tc, V)`: continue the cached contexts `rows`
    (a row may repeat) with right-padded continuation tokens.
    """

    max_length: int = 2048
    device: Any = "cpu"

    # tokenization hooks
    def tok_encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def tok_decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    @property
    def prefix_token_id(self) -> int:
        raise NotImplementedError

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: (context ids, continuation ids) with trailing context spaces moved to the answer."""
        if context == "":
            return [self.prefix_token_id], self.tok_encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    def _loglikelihood(self, requests, on_result=None):
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests], on_result)

    def _loglikelihood_rolling(self, texts, on_result=None):
        # Each text becomes disjoint windows of at most max_length predicted tokens (lm-eval's rolling windows);
        # the first token is predicted from the start-of-text token.
        pieces: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            toks = self.tok_encode(text)
            full = [self.prefix_token_id] + toks
            L = self.max_length
            for s in range(0, max(len(toks), 1), L):
                cont = toks[s:s + L]
                ctx = full[max(0, s + len(cont) - L): s + 1]  # ctx + cont - 1 <= L tokens
                pieces.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(texts)
        remaining = [owner.count(i) for i in range(len(texts))]

        def collect(j: int, res: tuple[float, bool]) -> None:
            i = owner[j]
            totals[i] += res[0]
            remaining[i] -= 1
            if remaining[i] == 0 and on_result is not None:
                on_result(i, totals[i])

        self.loglikelihood_tokens(pieces, collect)
        return totals

    def loglikelihood_tokens(self, requests: list[tuple[list[int], list[int]]], on_result: OnResult | None = None
                             ) -> list[tuple[float, bool]]:
        """Score token-level (context, continuation) pairs; contexts shared by several requests run once."""
        import torch

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(requests):
            if not ctx:
                ctx = [self.prefix_token_id]
            over = len(ctx) + len(cont) - (self.max_length + 1)
            if over > 0:  # keep the most recent tokens, like lm-eval's left truncation
                ctx = ctx[over:] if over < len(ctx) else ctx[-1:]
                cont = cont[-(self.max_length):]
            if not cont:
                results[i] = (0.0, True)
                if on_result:
                    on_result(i, results[i])
                continue
            requests[i] = (ctx, cont)
            groups.setdefault(tuple(ctx), []).append(i)
        # Longest first: the first batch is the largest, so memory trouble shows at once, and similar lengths
        # land in the same batch (little padding).
        order = sorted(groups.items(), key=lambda kv: -(len(kv[0]) + max(len(requests[i][1]) for i in kv[1])))
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        rows = max_ctx = max_cont = 0
        with torch.inference_mode():
            for item in order:
                n = len(item[1])
                c_len, x_len = len(item[0]), max(len(requests[i][1]) for i in item[1])
                # A batch holds the longest context plus the longest continuation: keep that within the window.
                too_long = max(max_ctx, c_len) + max(max_cont, x_len) - 1 > self.max_length
                if batch and (rows + n > self.batch_size or len(batch) >= self.batch_size or too_long):
                    self._score_batch(batch, requests, results, on_result)
                    batch, rows, max_ctx, max_cont = [], 0, 0, 0
                batch.append(item)
                rows += n
                max_ctx, max_cont = max(max_ctx, c_len), max(max_cont, x_len)
            if batch:
                self._score_batch(batch, requests, results, on_result)
        return results  # type: ignore[return-value]

    def _score_batch(self, batch, requests, results, on_result) -> None:
        import torch

        ctxs = [list(c) for c, _ in batch]
        T = max(len(c) for c in ctxs)
        ids = torch.zeros(len(ctxs), T, dtype=torch.long)  # (B, T) left-padded contexts
        mask = torch.zeros(len(ctxs), T, dtype=torch.long)
        for b, c in enumerate(ctxs):
            ids[b, T - len(c):] = torch.tensor(c)
            mask[b, T - len(c):] = 1
        last, state = self._prefill(ids.to(self.device), mask.to(self.device))
        last = torch.log_softmax(last.float(), dim=-1)  # (B, V): predicts each continuation's first token
        row_of: list[int] = []
        req_of: list[int] = []
        for b, (_, idxs) in enumerate(batch):
            row_of += [b] * len(idxs)
            req_of += idxs
        conts = [requests[i][1] for i in req_of]
        Tc = max(len(c) for c in conts)
        rest = None
        if Tc > 1:  # later tokens need the continuation itself through the model
            cids = torch.zeros(len(conts), Tc - 1, dtype=torch.long)  # (N, Tc-1) right-padded, last token unused
            for n, c in enumerate(conts):
                cids[n, :len(c) - 1] = torch.tensor(c[:-1])
            logits = self._extend(state, torch.tensor(row_of, device=self.device), cids.to(self.device))
            rest = torch.log_softmax(logits.float(), dim=-1)  # (N, Tc-1, V)
        for n, i in enumerate(req_of):
            c = conts[n]
            first = last[row_of[n]]
            lp = float(first[c[0]])
            greedy = int(first.argmax()) == c[0]
            if len(c) > 1:
                tgt = torch.tensor(c[1:], device=rest.device)
                seg = rest[n, : len(c) - 1]  # (len-1, V)
                lp += float(seg.gather(-1, tgt[:, None]).sum())
                greedy = greedy and bool((seg.argmax(-1) == tgt).all())
            results[i] = (lp, greedy)
            if on_result:
                on_result(i, results[i])

    def _prefill(self, ids, mask):
        raise NotImplementedError

    def _extend(self, state, rows, ids):
        raise NotImplementedError


class PhiforgeLM(TorchLM):
    """A native phiforge model + tokenizer (tokenizer API: encode, decode, eos_token_id)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16, identity: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = model.config.max_position_embeddings
        self.device = model.lm_head.weight.device
        self.identity = identity or f"phiforge-object-{id(model)}"

    @classmethod
    def load(cls, path: str | os.PathLike, *, dtype: str | None = None, device: str = "cpu",
             batch_size: int = 16) -> PhiforgeLM:
        """Load a checkpoint directory (weights + tokenizer files)."""
        from phiforge.checkpoint import load_checkpoint, resolve_checkpoint, weight_files
        from phiforge.tokenizer import load_tokenizer

        where = resolve_checkpoint(path)
        model = load_checkpoint(where, dtype=dtype, device=device)
        tok = load_tokenizer(where)
        ident = f"phiforge:{where.resolve()}:{files_fingerprint(list(set(weight_files(where).values())))}:{dtype}"
        return cls(model, tok, batch_size=batch_size, identity=ident)

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.tokenizer.eos_token_id

    def _prefill(self, ids, mask):
        B, T = ids.shape
        self._ctx_len = T
        cache = self.model.new_cache(B, T)  # grown in _extend once the continuation length is known
        padded = bool((mask == 0).any())
        logits = self.model(ids, attention_mask=mask if padded else None, cache=cache, last_only=True)
        return logits[:, -1], cache

    def _extend(self, cache, rows, ids):
        import torch

        # The prefill cache holds exactly the context; copy it into a cache with room for the continuation,
        # one row per continuation (a context's rows repeat for each of its answers).
        N, Tc = ids.shape
        big = self.model.new_cache(N, cache.length + Tc)
        for layer in range(len(cache.k)):
            big.k[layer][:, :, : cache.length] = cache.k[layer][rows]
            big.v[layer][:, :, : cache.length] = cache.v[layer][rows]
        big.length = cache.length
        big.valid_count = cache.valid_count[rows].clone()
        if cache.key_mask is not None:
            big.key_mask = torch.zeros(N, big.max_len, dtype=torch.bool, device=ids.device)
            big.key_mask[:, : cache.length] = cache.key_mask[rows, : cache.length]
        # Right padding needs no mask: causal attention never lets a real token see the padding after it.
        return self.model(ids, attention_mask=torch.ones_like(ids) if big.key_mask is not None else None,
                          cache=big)

    def _generate(self, requests, on_result=None):
        from phiforge.generate import GenerationConfig, generate

        out: list[str] = [""] * len(requests)
        for idxs in _generation_batches(requests, self.batch_size, lambda r: len(r.context)):
            r0 = requests[idxs[0]]
            cfg = GenerationConfig(max_new_tokens=r0.max_tokens, temperature=r0.sampling.temperature,
                                   top_k=r0.sampling.top_k, top_p=r0.sampling.top_p, seed=r0.sampling.seed,
                                   stop=list(r0.stop), eos_token_id=self.tokenizer.eos_token_id)
            # Prompts longer than the context keep their most recent tokens (room left for the answer).
            keep = max(1, self.max_length - r0.max_tokens)
            prompts = [self.tok_decode(self.tok_encode(requests[i].context)[-keep:]) for i in idxs]
            texts = generate(self.model, self.tokenizer, prompts, cfg)
            for i, t in zip(idxs, texts):
                out[i] = _cut_at_stop(t, r0.stop)
                if on_result:
                    on_result(i, out[i])
        return out


def _generation_batches(requests: list[GenRequest], batch_size: int, length: Callable[[GenRequest], int]
                        ) -> list[list[int]]:
    """Indices grouped by identical generation settings, longest prompts first, at most batch_size each."""
    by_cfg: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        by_cfg.setdefault((r.stop, r.max_tokens, r.sampling), []).append(i)
    batches = []
    for idxs in by_cfg.values():
        idxs.sort(key=lambda i: -length(requests[i]))
        batches += [idxs[k:k + batch_size] for k in range(0, len(idxs), batch_size)]
    return batches


class HFLM(TorchLM):
    """A transformers causal LM (directory, .gguf file, alias or hub id)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16, identity: str | None = None,
                 max_length: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.max_length = max_length or int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.identity = identity or f"hf-object-{id(model)}"

    @classmethod
    def load(cls, spec: str | os.PathLike, *, dtype: str | None = None, device: str = "cpu",
             batch_size: int = 16) -> HFLM:
        from phiforge.checkpoint import parse_dtype
        from phiforge.hub import load_hf_causal_lm, resolve_hf_model

        where, gguf = resolve_hf_model(spec)
        model, tok = load_hf_causal_lm(spec, dtype=parse_dtype(dtype), device=device)
        p = Path(where)
        if gguf:
            fp = files_fingerprint([p / gguf])
        elif p.is_dir():
            fp = files_fingerprint([f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".json")])
        else:
            fp = "hub"
        return cls(model, tok, batch_size=batch_size, identity=f"hf:{where}:{gguf}:{fp}:{dtype}")

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def _prefill(self, ids, mask):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) left padding: real tokens count from 0
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], (out.past_key_values, mask)

    def _extend(self, state, rows, ids):
        import torch

        cache, mask = state
        cache.batch_select_indices(rows)  # (N, heads, T, hd): one row per continuation
        N, Tc = ids.shape
        ctx_mask = mask[rows]  # (N, T)
        full = torch.cat([ctx_mask, torch.ones(N, Tc, dtype=mask.dtype, device=mask.device)], dim=1)
        pos = ctx_mask.sum(-1, keepdim=True) + torch.arange(Tc, device=ids.device)[None]  # (N, Tc)
        import inspect

        # transformers >= 5.x names the argument `cache` (past_key_values is deprecated); older ones only know it
        # as past_key_values.
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        return self.model(input_ids=ids, attention_mask=full, position_ids=pos, use_cache=True,
                          **{name: cache}).logits

    def _generate(self, requests, on_result=None):
        import torch

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out: list[str] = [""] * len(requests)
        for idxs in _generation_batches(requests, self.batch_size, lambda r: len(r.context)):
            r0 = requests[idxs[0]]
            keep = max(1, self.max_length - r0.max_tokens)
            encs = [self.tok_encode(requests[i].context)[-keep:] for i in idxs]
            T = max(len(e) for e in encs)
            ids = torch.full((len(encs), T), pad, dtype=torch.long)
            mask = torch.zeros(len(encs), T, dtype=torch.long)
            for b, e in enumerate(encs):
                ids[b, T - len(e):] = torch.tensor(e)
                mask[b, T - len(e):] = 1
            kwargs: dict[str, Any] = {"do_sample": r0.sampling.temperature > 0}
            if kwargs["do_sample"]:
                kwargs.update(temperature=r0.sampling.temperature, top_p=r0.sampling.top_p, top_k=r0.sampling.top_k)
                if r0.sampling.seed is not None:
                    torch.manual_seed(r0.sampling.seed)
            if r0.stop:
                kwargs.update(stop_strings=list(r0.stop), tokenizer=tok)
            with torch.inference_mode():
                gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          max_new_tokens=r0.max_tokens, pad_token_id=pad, **kwargs)
            for b, i in enumerate(idxs):
                out[i] = _cut_at_stop(self.tok_decode(gen[b, T:].tolist()), r0.stop)
                if on_result:
                    on_result(i, out[i])
        return out


# ---- OpenAI-compatible endpoint -----------------------------------------------------------------------------
class OpenAILM(LM):
    """An OpenAI-compatible completions endpoint (`base_url` like http://host:port/v1).

    Log-likelihood asks for the prompt's own token logprobs (`echo=true, logprobs=1, max_tokens=0`) and sums
    those of the tokens that start at or after the end of the context; servers that do not return prompt
    logprobs raise a clear error.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, batch_size: int = 16,
                 timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY", "")
        self.batch_size = batch_size
        self.timeout = timeout
        self.identity = f"openai:{self.base_url}:{model}"

    def _post(self, payload: dict) -> dict:
        req = urllib.request.Request(f"{self.base_url}/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise PhiforgeError(f"{self.base_url}/completions: HTTP {e.code}: {e.read()[:300]!r}") from None
        except urllib.error.URLError as e:
            raise PhiforgeError(f"{self.base_url}/completions: cannot connect ({e.reason})") from None

    def _echo_logprobs(self, prompts: list[str]) -> list[dict]:
        data = self._post({"model": self.model, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1,
                           "temperature": 0.0})
        choices = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
        lps = [c.get("logprobs") for c in choices]
        if len(lps) != len(prompts) or any(not lp or not lp.get("token_logprobs") for lp in lps):
            raise PhiforgeError(f"{self.base_url}: the server does not return prompt logprobs (echo=true, "
                                f"logprobs=1); log-likelihood tasks need them — use generation tasks only")
        return lps

    def _loglikelihood(self, requests, on_result=None):
        out: list[tuple[float, bool]] = []
        for s in range(0, len(requests), self.batch_size):
            chunk = requests[s:s + self.batch_size]
            for k, ((ctx, cont), lp) in enumerate(zip(chunk, self._echo_logprobs([c + x for c, x in chunk]))):
                total, greedy = 0.0, True
                end = len(ctx) + len(cont)
                for j, (t, off, v) in enumerate(zip(lp["tokens"], lp["text_offset"], lp["token_logprobs"])):
                    if off < len(ctx) or off >= end:
                        continue
                    total += float(v if v is not None else 0.0)
                    top = (lp.get("top_logprobs") or [None] * (j + 1))[j]
                    if top:
                        greedy = greedy and max(top, key=top.get) == t
                out.append((total, greedy))
                if on_result:
                    on_result(s + k, out[-1])
        return out

    def _loglikelihood_rolling(self, texts, on_result=None):
        out: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            for k, lp in enumerate(self._echo_logprobs(texts[s:s + self.batch_size])):
                out.append(float(sum(v for v in lp["token_logprobs"] if v is not None)))
                if on_result:
                    on_result(s + k, out[-1])
        return out

    def _generate(self, requests, on_result=None):
        out: list[str] = [""] * len(requests)
        for idxs in _generation_batches(requests, self.batch_size, lambda r: len(r.context)):
            r0 = requests[idxs[0]]
            payload = {"model": self.model, "prompt": [requests[i].context for i in idxs],
                       "max_tokens": r0.max_tokens, "temperature": r0.sampling.temperature}
            if r0.stop:
                payload["stop"] = list(r0.stop)[:4]  # the OpenAI API allows at most 4; the rest are cut here
            if r0.sampling.top_p is not None:
                payload["top_p"] = r0.sampling.top_p
            if r0.sampling.seed is not None:
                payload["seed"] = r0.sampling.seed
            choices = sorted(self._post(payload).get("choices", []), key=lambda c: c.get("index", 0))
            for i, c in zip(idxs, choices):
                out[i] = _cut_at_stop(c.get("text", ""), r0.stop)
                if on_result:
                    on_result(i, out[i])
        return out


def load_lm(spec: str, *, backend: str = "auto", dtype: str | None = None, device: str = "cpu",
            batch_size: int = 16, base_url: str | None = None) -> LM:
    """An LM from a model spec: backend auto = phiforge for a phiforge checkpoint dir, openai when base_url is
    given, transformers otherwise (HF directory, .gguf file, alias like `smollm2`, hub id)."""
    if backend == "auto":
        if base_url:
            backend = "openai"
        elif Path(spec).is_dir() and (Path(spec) / "config.json").exists() and _is_phiforge_dir(Path(spec)):
            backend = "phiforge"
        else:
            backend = "hf"
    if backend == "openai":
        if not base_url:
            raise PhiforgeError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        return OpenAILM(base_url, spec, batch_size=batch_size)
    if backend == "phiforge":
        return PhiforgeLM.load(spec, dtype=dtype, device=device, batch_size=batch_size)
    if backend == "hf":
        return HFLM.load(spec, dtype=dtype, device=device, batch_size=batch_size)
    raise PhiforgeError(f"unknown backend {backend!r} (choose auto, phiforge, hf, openai)")


def _is_phiforge_dir(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("model_type") == "phi"
