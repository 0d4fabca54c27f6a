"""The log-likelihood engine the torch backends share (native phiforge and transformers).

Tokenization follows lm-evaluation-harness so scores are identical: trailing spaces of the context move to the
continuation, the pair is encoded as one string and split at the length of the context's own encoding, and an
empty context is replaced by the start-of-text token.

Speed: requests are grouped by context and each group becomes ONE segment: the context, then every continuation
(less its last token, which is only a target) laid end to end. A block attention mask lets the context attend
causally and each continuation attend to the context and its own earlier tokens only, and each continuation's
position ids restart at the context length, so every token sees exactly what it would see in its own
(context + continuation) sequence: a multiple-choice item costs its context once plus its answers. Segments are
packed end to end into rows (several short items share a row; the mask keeps them apart), so there is almost no
padding; rows are batched up to a token budget; the LM head and the log-softmax run only at the positions that
predict a continuation token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phiforge.lm.base import LM, OnResult

# Log-likelihood batches are bounded by tokens, not requests: `batch_size` B allows B * 256 padded tokens per
# forward pass (rows of one context + all its answers vary too much in length for a fixed row count).
TOKENS_PER_BATCH_SLOT = 256


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
