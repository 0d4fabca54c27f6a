"""The Phi tokenizer: byte-level BPE in the GPT-2 / CodeGen style, trained here or loaded from a checkpoint.

Phi-1/1.5/2 use CodeGen's tokenizer: GPT-2's byte-level BPE, `<|endoftext|>` as BOS, EOS and padding, plus added
tokens for runs of spaces and tabs so that indented code costs one token per indent instead of one per space.
`train_tokenizer` builds the same kind of tokenizer from a corpus; `load_tokenizer` reads any tokenizer.json
(ours, or the one beside a real microsoft/phi checkpoint). Both give a `PhiTokenizer`, which

- encodes without adding special tokens (packing inserts `<|endoftext|>` between documents itself);
- decodes losslessly: `decode(encode(s)) == s` for any UTF-8 string (byte-level alphabet, no normalizer, and no
  HF-style "clean up tokenization spaces");
- saves a directory that `transformers.AutoTokenizer.from_pretrained` loads and that encodes identically.

The model's embedding is `model_vocab_size(tok)`: the tokenizer size rounded up to a multiple of 64, as Phi's
51200 rows hold CodeGen's 50295 tokens.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from phiforge.errors import PhiforgeError

EOS_TOKEN = "<|endoftext|>"
# CodeGen adds runs of 2..31 spaces and 2..9 tabs; we go to 32 spaces (eight 4-space indents).
SPACE_RUNS = range(2, 33)
TAB_RUNS = range(2, 10)
# What the added whitespace tokens cut out of a text before BPE sees it (longest run first, like the tokenizer's
# leftmost-longest matching), so training sees exactly the pieces encoding will see.
_WS_RUN = re.compile(f" {{2,{SPACE_RUNS[-1]}}}|\t{{2,{TAB_RUNS[-1]}}}")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"


class PhiTokenizer:
    """A `tokenizers.Tokenizer` with Phi's conventions. `.backend` is the wrapped tokenizer."""

    def __init__(self, backend: Any, *, eos_token: str = EOS_TOKEN, chat_template: str | None = None,
                 model_max_length: int | None = None, source: str = "tokenizer") -> None:
        self.backend = backend
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        eos = backend.token_to_id(eos_token)
        if eos is None:
            raise PhiforgeError(f"{source}: the tokenizer has no {eos_token!r} token (needed as end of text)")
        self.eos_token_id: int = eos

    # <|endoftext|> plays every role in Phi: document separator, BOS for generation, and padding.
    @property
    def bos_token_id(self) -> int:
        return self.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.eos_token_id

    @property
    def bos_token(self) -> str:
        return self.eos_token

    @property
    def pad_token(self) -> str:
        return self.eos_token

    def __len__(self) -> int:
        """Number of token ids, added tokens included (the embedding needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def __repr__(self) -> str:
        return f"PhiTokenizer(size={len(self)}, eos={self.eos_token!r}:{self.eos_token_id})"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids` (a list, array or tensor of ints); lossless unless special tokens are skipped."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def hash(self) -> str:
        """sha256 of the canonical (compact) tokenizer.json: equal for equal tokenizers, however they were saved.
        Token shards record it, so data tokenized with one tokenizer is never trained with another."""
        return hashlib.sha256(self.backend.to_str(pretty=False).encode("utf-8")).hexdigest()

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
        from phiforge.atomic import atomic_write_json, atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        special = {"bos_token": self.eos_token, "eos_token": self.eos_token, "unk_token": self.eos_token,
                   "pad_token": self.eos_token}
        config: dict[str, Any] = {
            # The generic fast tokenizer loads tokenizer.json exactly as written; a model-specific class
            # (CodeGenTokenizer, GPT2Tokenizer) may rebuild parts of the pipeline in some transformers versions.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            # HF's default clean-up deletes spaces before punctuation: never, or decoding would not be lossless.
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_json(out / CONFIG_FILE, config)
        atomic_write_json(out / SPECIAL_TOKENS_FILE, special)
        return out


def model_vocab_size(tokenizer: PhiTokenizer) -> int:
    """Embedding rows a model needs for `tokenizer`: its size rounded up to a multiple of 64 (as Phi's 51200)."""
    from phiforge.config import pad_vocab

    return pad_vocab(len(tokenizer))


def whitespace_tokens() -> list[str]:
    """The added tokens for runs of spaces and tabs (shortest first)."""
    return [" " * n for n in SPACE_RUNS] + ["\t" * n for n in TAB_RUNS]


def _without_whitespace_runs(texts: Iterable[str]) -> Iterator[str]:
    """The pieces of each text between whitespace runs: what BPE sees once the added tokens are cut out."""
    for text in texts:
        for piece in _WS_RUN.split(text):
            if piece:
                yield piece


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
                    show_progress: bool = False) -> PhiTokenizer:
    """Train a byte-level BPE tokenizer with Phi's conventions on `texts`.

    `vocab_size` counts everything: `<|endoftext|>` (id 0), the 256 byte tokens, the learned merges and the
    whitespace-run tokens (the last ids). Merges stop early when the corpus has no pair seen `min_frequency`
    times, so a small corpus gives a smaller tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    ws = whitespace_tokens()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    floor = 1 + len(alphabet) + len(ws)
    if vocab_size < floor:
        raise PhiforgeError(f"tokenizer vocab_size {vocab_size} is too small: it needs at least {floor} "
                            f"(<|endoftext|>, {len(alphabet)} bytes, {len(ws)} whitespace-run tokens)")
    tok = Tokenizer(models.BPE())
    # GPT-2's pre-tokenizer (regex split, bytes mapped to printable chars) without a prefix space: lossless.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ws), min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,  # every byte is a token: any UTF-8 text encodes, nothing is unknown
        show_progress=show_progress,
    )
    seen = [0]

    def counted(pieces: Iterable[str]) -> Iterator[str]:
        for piece in pieces:
            seen[0] += 1
            yield piece

    tok.train_from_iterator(counted(_without_whitespace_runs(texts)), trainer=trainer)
    if not seen[0]:
        raise PhiforgeError("tokenizer training got no text (empty corpus)")
    # normalized=False: matched on the raw text; not special: decoded even with skip_special_tokens, and
    # emitted verbatim by the byte-level decoder (spaces and tabs are not byte-level alphabet chars).
    tok.add_tokens([AddedToken(s, normalized=False, special=False, lstrip=False, rstrip=False, single_word=False)
                    for s in ws])
    return PhiTokenizer(tok)


def load_tokenizer(path: str | os.PathLike) -> PhiTokenizer:
    """Load a tokenizer.json, or the tokenizer in a directory (e.g. a checkpoint). Reads tokenizer_config.json
    beside it, when present, for the EOS token, the chat template and the model's maximum length."""
    from tokenizers import Tokenizer

    p = Path(path)
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        where = f"{p}: no {TOKENIZER_FILE} in this directory" if p.is_dir() else f"{file}: no such tokenizer file"
        raise PhiforgeError(where)
    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side reports JSON / schema errors as a plain Exception
        raise PhiforgeError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0] if str(e) else e!r})"
                            ) from None
    config: dict[str, Any] = {}
    cfg_file = file.parent / CONFIG_FILE
    if cfg_file.exists():
        from phiforge.readers import read_json

        config = read_json(cfg_file, what="a tokenizer config", error=PhiforgeError)
    eos = config.get("eos_token") or EOS_TOKEN
    if isinstance(eos, dict):  # older transformers wrote AddedToken dicts
        eos = eos.get("content", EOS_TOKEN)
    template = config.get("chat_template")
    jinja = file.parent / "chat_template.jinja"  # transformers >= 4.50 saves the template as its own file
    if template is None and jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    max_len = config.get("model_max_length")
    max_len = int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e9 else None
    return PhiTokenizer(backend, eos_token=eos, chat_template=template, model_max_length=max_len,
                        source=str(file))
