"""The model interface every task talks to, and its backends.

One interface of three methods (each takes one request or a list of them; lists are batched):

    loglikelihood(context, continuation)            -> (log P(continuation | context), is_greedy)
    loglikelihood_rolling(text)                      -> log P(text) (from the start-of-text token)
    generate_until(context, stop, max_tokens, sampling) -> completion text, cut before the first stop string

Backends:
- `PhiforgeLM`: a native phiforge checkpoint (phiforge.model; generation through phiforge.generate).
- `HFLM`: any Hugging Face causal LM through transformers: a directory, a `.gguf` file (`gguf_file=`), an
  alias such as `smollm2`, or a hub id.
- `OpenAILM`: any OpenAI-compatible `/v1/completions` endpoint: generation always; log-likelihood when the
  server returns prompt logprobs (`echo=true, logprobs=1`).

Tokenization follows lm-evaluation-harness so scores are identical: trailing spaces of the context move to the
continuation, the pair is encoded as one string and split at the length of the context's own encoding, and an
empty context is replaced by the start-of-text token.

Speed (the torch backends): requests are grouped by context and each group becomes ONE segment: the context,
then every continuation (less its last token, which is only a target) laid end to end. A block attention mask
lets the context attend causally and each continuation attend to the context and its own earlier tokens only,
and each continuation's position ids restart at the context length, so every token sees exactly what it would
see in its own (context + continuation) sequence: a multiple-choice item costs its context once plus its answers.
Segments are packed end to end into rows (several short items share a row; the mask keeps them apart), so
there is almost no padding; rows are batched up to a token budget; the LM head and the log-softmax run only at
the positions that predict a continuation token.
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

# Log-likelihood batches are bounded by tokens, not requests: `batch_size` B allows B * 256 padded tokens per
# forward pass (rows of one context + all its answers vary too much in length for a fixed row count).
TOKENS_PER_BATCH_SLOT = 256

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

    `_packed_hidden(ids (B, T), pos (B, T), allowed (B, T, T) bool) -> hidden (B, T, d)` (a forward with an
    arbitrary attention pattern and explicit positions) and `_head(hidden (M, d)) -> logits (M, V)`.

    `max_batch_tokens` bounds a batch's padded size (rows x widest row); `max_batch_rows` its row count.
    """

    max_length: int = 2048
    device: Any = "cpu"
    max_batch_tokens: int = 4096
    max_batch_rows: int = 256

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
        """Score token-level (context, continuation) pairs; a context shared by several requests runs once."""
        import torch

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        todo = list(requests)
        for i, (ctx, cont) in enumerate(todo):
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
            todo[i] = (ctx, cont)
            groups.setdefault(tuple(ctx), []).append(i)
        segments = pack_segments(groups, todo, self.max_length)
        # Segments are laid end to end into rows of one width (no padding but a row's tail); a batch holds as
        # many rows as the token budget allows.
        rows = fill_rows(segments, max(ROW_TOKENS, max(x.length for x in segments)) if segments else 0)
        n = max(1, min(self.max_batch_tokens // max((r.length for r in rows), default=1), self.max_batch_rows))
        with torch.inference_mode():
            for s in range(0, len(rows), n):
                self._score_rows(rows[s:s + n], todo, results, on_result)
        return results  # type: ignore[return-value]

    def _score_rows(self, rows: list[Row], requests, results, on_result) -> None:
        import torch

        ids, pos, seg, part = rows_to_tensors(rows)
        allowed = block_mask(seg, part)  # (B, T, T)
        h = self._packed_hidden(ids.to(self.device), pos.to(self.device), allowed.to(self.device))  # (B, T, d)
        # Only the positions that predict a continuation token go through the LM head and the log-softmax
        # (a 49k-vocab head over every context position would cost more than the transformer itself).
        at_row, at_col, target, order = [], [], [], []
        for b, row in enumerate(rows):
            for x, off in zip(row.segments, row.offsets):
                for i, start in zip(x.requests, x.starts):
                    cont = requests[i][1]
                    # the context's last token predicts cont[0]; cont[k] (at start + k) predicts cont[k + 1]
                    at_col += [off + x.ctx_len - 1] + list(range(off + start, off + start + len(cont) - 1))
                    at_row += [b] * len(cont)
                    target += cont
                    order.append(i)
        sel = h[torch.tensor(at_row, device=h.device), torch.tensor(at_col, device=h.device)]  # (M, d)
        tgt = torch.tensor(target, device=h.device)  # (M,)
        lp_tok = torch.empty(len(target), dtype=torch.float32)
        hit = torch.empty(len(target), dtype=torch.bool)
        for s in range(0, len(target), 1024):  # chunks bound the (M, V) logits in memory
            logits = self._head(sel[s:s + 1024]).float()  # (m, V)
            t = tgt[s:s + 1024]
            lp_tok[s:s + 1024] = torch.log_softmax(logits, dim=-1).gather(-1, t[:, None])[:, 0].cpu()
            hit[s:s + 1024] = (logits.argmax(-1) == t).cpu()
        k = 0
        for i in order:
            n = len(requests[i][1])
            results[i] = (float(lp_tok[k:k + n].sum()), bool(hit[k:k + n].all()))
            k += n
            if on_result:
                on_result(i, results[i])

    def _packed_hidden(self, ids, pos, allowed):
        """Final hidden states (B, T, d) of rows `ids` (B, T) at positions `pos` (B, T), where query t sees key s
        iff `allowed[b, t, s]` (bool (B, T, T))."""
        raise NotImplementedError

    def _head(self, h):
        """Logits (M, V) of final hidden states (M, d)."""
        raise NotImplementedError


# Rows are at least this wide, so short segments (e.g. ARC questions and their answers) share a row.
ROW_TOKENS = 256


@dataclass
class Segment:
    """One context followed by (all but the last token of) each of its continuations, laid end to end."""

    ctx: tuple[int, ...]
    requests: list[int]  # request indices, in layout order
    starts: list[int]  # where each continuation's tokens begin in the segment
    tokens: list[int]

    @property
    def ctx_len(self) -> int:
        return len(self.ctx)

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class Row:
    """Segments laid end to end in one batch row; `offsets` are where they begin."""

    segments: list[Segment]
    offsets: list[int]
    length: int = 0


def pack_segments(groups: dict[tuple[int, ...], list[int]], requests: list[tuple[list[int], list[int]]],
                  max_length: int) -> list[Segment]:
    """A segment per context with all its continuations (their last token is only a target, so it is left out),
    at most `max_length` tokens each: a context with more answers than fit gets several segments."""
    out: list[Segment] = []
    for ctx, idxs in groups.items():
        seg = Segment(ctx, [], [], list(ctx))
        for i in idxs:
            body = requests[i][1][:-1]
            if seg.requests and seg.length + len(body) > max_length:
                out.append(seg)
                seg = Segment(ctx, [], [], list(ctx))
            seg.requests.append(i)
            seg.starts.append(seg.length)
            seg.tokens += body
        out.append(seg)
    return out


def fill_rows(segments: list[Segment], width: int, lookback: int = 16) -> list[Row]:
    """Pack segments into rows of at most `width` tokens, longest first, each into the first of the last
    `lookback` rows with room (first-fit decreasing, bounded so it stays linear). Rows come out longest first."""
    rows: list[Row] = []
    for x in sorted(segments, key=lambda x: -x.length):
        for r in rows[-lookback:]:
            if r.length + x.length <= width:
                break
        else:
            r = Row([], [])
            rows.append(r)
        r.segments.append(x)
        r.offsets.append(r.length)
        r.length += x.length
    rows.sort(key=lambda r: -r.length)
    return rows


def rows_to_tensors(rows: list[Row]):
    """ids, position ids, segment ids and part ids (B, T), right-padded to the longest row.

    Segment ids number a row's segments from 0 (-1 = padding). Part 0 of a segment is its context, part j + 1
    its continuation j. A continuation's positions restart at the context length, so each one sees exactly the
    positions it would have in its own sequence.
    """
    import torch

    T = max(r.length for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    part = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        for n, (x, off) in enumerate(zip(r.segments, r.offsets)):
            ids[b, off:off + x.length] = torch.tensor(x.tokens)
            seg[b, off:off + x.length] = n
            pos[b, off:off + x.ctx_len] = torch.arange(x.ctx_len)
            ends = x.starts[1:] + [x.length]
            for j, (a, e) in enumerate(zip(x.starts, ends)):
                pos[b, off + a:off + e] = torch.arange(x.ctx_len, x.ctx_len + e - a)
                part[b, off + a:off + e] = j + 1
    return ids, pos, seg, part


def block_mask(seg, part):
    """Attention pattern (B, T, T) from segment and part ids (B, T): causal within a segment, and a continuation
    sees its context and its own earlier tokens only. A padding query sees itself (an empty row would give NaN;
    its output is unused)."""
    import torch

    T = seg.shape[1]
    sq, sk = seg[:, :, None], seg[:, None, :]  # (B, T, 1), (B, 1, T)
    pq, pk = part[:, :, None], part[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal & (sk >= 0) & (sk == sq) & ((pk == 0) | (pk == pq))
    return allowed | torch.eye(T, dtype=torch.bool)


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

    def _packed_hidden(self, ids, pos, allowed):
        # Phi.forward only takes a (B, T) padding mask, so run its blocks with the block mask directly
        # (the same calls Phi.hidden_states makes, minus the KV cache).
        m = self.model
        x = m.model.embed_tokens(ids)  # (B, T, d)
        cos, sin = m.rotary(pos, x.dtype)  # (B, 1, T, rotary_dim)
        mask = allowed[:, None]  # (B, 1, T, T), True = may attend
        for i, block in enumerate(m.model.layers):
            x = block(x, cos, sin, mask, False, None, i)
        return m.model.final_layernorm(x)

    def _head(self, h):
        return self.model.lm_head(h)

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
                 max_length: int | None = None, max_batch_tokens: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens or TOKENS_PER_BATCH_SLOT * batch_size
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
