"""Text generation with a static KV cache: greedy or sampled, batched (left padding), streaming, stop strings.

Two layers:
- `generate_ids` works on token ids only: prefill the (left-padded) prompts once, then decode one token per
  step for every unfinished row. Rows that finish (eos, max tokens, or a caller-requested stop) are dropped
  from the batch and from the KV cache, so the remaining rows do not pay for them.
- `generate` is the thin text layer: tokenize, call `generate_ids` with a per-token callback that decodes
  incrementally, cuts the text at a stop string and streams text increments to a terminal.

Sampling follows Hugging Face's order and semantics: repetition penalty -> temperature -> top-k -> top-p, so
`temperature=0` (greedy) is token-identical to `transformers`' `generate(do_sample=False)` on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import torch

from phiforge.lm.sampling import Sampling, cut_at_stop, find_stop

if TYPE_CHECKING:
    from phiforge.decode import Decoder
    from phiforge.model import Phi


@dataclass(frozen=True)
class GenerationConfig(Sampling):
    """The one `Sampling` (phiforge.lm.sampling: temperature, top-k/p, repetition penalty, seed, max_new_tokens,
    stop strings) plus the end-of-text handling of the token-level generator. `temperature=0` means greedy."""

    max_new_tokens: int = 128
    eos_token_id: int | None = None  # stop a row on this token (it is kept in the ids, not in the text)
    ignore_eos: bool = False


# ---- token selection ------------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor: logits (B, V) of tokens marked in `seen` (B, V) bool are divided
    by `penalty` when positive and multiplied by it when negative (each token once, however often it occurred)."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept, like HF)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering as HF's TopPLogitsWarper: drop the least likely tokens whose total mass is <= 1 - p,
    always keeping the most likely one."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # ascending, as HF
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    remove_sorted = cum <= (1 - p)
    remove_sorted[:, -1] = False  # the most likely token always survives
    remove = remove_sorted.scatter(1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def next_tokens(logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from next-token logits (B, V) -> (B,)."""
    logits = logits.float()
    if seen is not None and cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        logits = filter_top_k(logits, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = filter_top_p(logits, cfg.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---- token-level generation -----------------------------------------------------------------------------------
TokenCallback = Callable[[int, int], Any]


# Most bytes of weight copies a decode plan may make on its own (oneDNN's prepacked bf16 layout copies every
# linear weight). Int8 models (serve/quant) and models loaded with `load_checkpoint(..., layout="decode")` are
# already in their kernel's layout: no copies, so no size limit.
PACK_LIMIT_BYTES = 2 << 30


def prepare_decoding(model: Phi, pack: bool | None = None) -> Decoder:
    """The model's decoder (phiforge.decode), with its fast decode plan if `pack`, or, when None, on the CPU: in the
    kernel's layout where its copies (`DecodePlan.copy_bytes`) are at most PACK_LIMIT_BYTES, else a plan reading
    the model's own weights ("plain" kernel). `Decoder.describe()` says which, and why."""
    from phiforge.checkpoint import human_bytes
    from phiforge.decode import DecodePlan, Decoder, default_kernel

    weight = model.model.embed_tokens.weight
    if pack is False:
        return Decoder(model, why="the model's modules were asked for (pack=False: compiled or reference decoding)")
    if pack is None and weight.device.type != "cpu":
        return Decoder(model, why=f"the model is on {weight.device.type} (decode plans are for CPU decoding)")
    kernel = default_kernel(weight)
    if pack is None and kernel != "plain":
        copies = DecodePlan.copy_bytes(model, kernel)
        if copies > PACK_LIMIT_BYTES:
            return Decoder.build(model, "plain", why=f"the {kernel!r} layout would copy {human_bytes(copies)} of "
                                                     f"weights, over PACK_LIMIT_BYTES; --quant int8 has no copies")
    return Decoder.build(model, kernel)


def generate_ids(model: Phi, prompts: list[list[int]], cfg: GenerationConfig, *, pad_token_id: int = 0,
                 on_token: TokenCallback | None = None, pack: bool | None = None) -> list[list[int]]:
    """Generate up to `cfg.max_new_tokens` new tokens after each prompt; returns only the new ids per prompt.

    Prompts of different lengths are left-padded into one batch. `on_token(row, token_id)` is called for every
    new token as it is produced (row = index into `prompts`); if it returns True that row stops (used for stop
    strings). A row also stops after `cfg.eos_token_id` (which is included in its ids) unless `cfg.ignore_eos`,
    or when the model's context is full.
    `pack` builds the fast decode path (`phiforge.decode.Decoder`: weights in the fastest kernel's layout, reused
    by later calls on the same model); None builds it on the CPU (see `prepare_decoding`). Greedy
    decoding without repetition penalty asks only for the argmax (`Decoder.greedy_step`), which skips most of the
    lm_head's fp32 traffic while returning the same token as the argmax of the full logits.
    """
    cfg.validate()
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest > context:
        raise ValueError(f"prompt of {longest} tokens exceeds the model's context of {context}")
    device = model.model.embed_tokens.weight.device
    decoder = prepare_decoding(model, pack)
    B = len(prompts)
    max_len = min(longest + cfg.max_new_tokens, context)
    eos = None if cfg.ignore_eos else cfg.eos_token_id
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed if cfg.seed is not None else int(torch.seed() % 2**63))

    out: list[list[int]] = [[] for _ in range(B)]
    if cfg.max_new_tokens == 0:
        return out
    with torch.inference_mode():
        ids = torch.full((B, longest), pad_token_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros(B, longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, longest - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        seen = None  # (B, V) which tokens each row contains, for the repetition penalty (padding excluded)
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
            seen.scatter_(1, ids, mask.bool())

        cache = model.new_cache(B, max_len)
        padded = bool((mask == 0).any())
        logits = decoder.step(ids, cache, mask if padded else None, last_only=True)[:, -1]  # (B, V)
        tok = next_tokens(logits, cfg, seen, generator)  # (B,)
        greedy = cfg.temperature == 0 and seen is None  # only the argmax matters: decoder.greedy_step
        rows = list(range(B))  # prompt index of each row still in the batch
        while True:
            keep: list[int] = []
            for j, t in enumerate(tok.tolist()):
                r = rows[j]
                out[r].append(t)
                stop = on_token(r, t) if on_token is not None else False
                if not (stop or t == eos or len(out[r]) >= cfg.max_new_tokens):
                    keep.append(j)
            if not keep or cache.length >= max_len:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch and the cache
                sel = torch.tensor(keep, device=device)
                cache.select(sel)
                tok = tok[sel]
                seen = seen[sel] if seen is not None else None
                rows = [rows[j] for j in keep]
            if seen is not None:
                seen[torch.arange(len(rows), device=device), tok] = True
            if greedy:
                tok = decoder.greedy_step(tok[:, None], cache)  # (B',)
            else:
                tok = next_tokens(decoder.step(tok[:, None], cache)[:, -1], cfg, seen, generator)  # (B',)
    return out


# ---- text-level generation ------------------------------------------------------------------------------------
class IncrementalDecoder:
    """Decode a growing list of token ids into text without re-decoding everything each step.

    Only a short window of recent tokens is decoded; text is released once it no longer ends in an incomplete
    UTF-8 sequence (a byte-level BPE token can hold half of a multi-byte character).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this index are already part of `text`
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add a token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += new
            return new
        return ""

    def flush(self) -> str:
        """Release whatever is left (an incomplete character decodes to U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        rest = self.tokenizer.decode(self.ids[self.prefix:])[len(before):]
        self.prefix = self.read = len(self.ids)
        self.text += rest
        return rest


def generate(model: Phi, tokenizer: Any, prompts: list[str], cfg: GenerationConfig,
             stream: TextIO | None = None, on_token: TokenCallback | None = None) -> list[str]:
    """Generate a completion for each prompt (text in, text out; prompts are not repeated in the output).

    The eos token ends a row and is not part of its text; the text is cut before the first stop string.
    With `stream` (a text file, e.g. sys.stdout) and a single prompt, text is written as it is generated.
    `on_token(row, token_id)` additionally sees every new token id (e.g. to count throughput).
    """
    if cfg.eos_token_id is None and not cfg.ignore_eos:
        cfg = GenerationConfig(**{**cfg.__dict__, "eos_token_id": getattr(tokenizer, "eos_token_id", None)})
    eos = None if cfg.ignore_eos else cfg.eos_token_id
    decoders = [IncrementalDecoder(tokenizer) for _ in prompts]
    done = [False] * len(prompts)  # text finished (stop string found)
    emitted = [0] * len(prompts)  # characters already streamed
    hold = max((len(s) for s in cfg.stop), default=1) - 1  # a stop string may still be forming in the tail
    streaming = stream is not None and len(prompts) == 1

    def emit(row: int, final: bool) -> None:
        text = decoders[row].text
        upto = len(text) if final else max(emitted[row], len(text) - hold)
        if streaming and upto > emitted[row]:
            stream.write(text[emitted[row]:upto])
            stream.flush()
        emitted[row] = max(emitted[row], upto)

    def on_new_token(row: int, token_id: int) -> bool:
        if on_token is not None:
            on_token(row, token_id)
        if token_id == eos:
            return True
        dec = decoders[row]
        new = dec.push(token_id)
        if new and cfg.stop:
            # Only the tail can hold a stop string that was not there before this token.
            start = max(0, len(dec.text) - len(new) - hold)
            cut = find_stop(dec.text, cfg.stop, start)
            if cut >= 0:
                dec.text = dec.text[:cut]
                done[row] = True
                return True
        emit(row, final=False)
        return False

    prompt_ids = [tokenizer.encode(p) for p in prompts]
    pad = getattr(tokenizer, "pad_token_id", None)
    generate_ids(model, prompt_ids, cfg, pad_token_id=pad if pad is not None else (eos or 0), on_token=on_new_token)
    texts = []
    for row, dec in enumerate(decoders):
        if not done[row]:
            dec.flush()
            dec.text = cut_at_stop(dec.text, cfg.stop)
        emit(row, final=True)
        texts.append(dec.text)
    if streaming:
        stream.write("\n")
        stream.flush()
    return texts
