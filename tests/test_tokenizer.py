"""The tokenizer: lossless byte-level BPE, cheap indentation, HF-compatible save, loads Phi's own tokenizer.json."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phiforge.errors import PhiforgeError
from phiforge.tokenizer import (
    EOS_TOKEN,
    PhiTokenizer,
    load_tokenizer,
    model_vocab_size,
    train_tokenizer,
    whitespace_tokens,
)

CORPUS = [
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        "
    "self.items.append(x)\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "The cat sat on the mat. The dog sat on the log. A textbook teaches one idea at a time.\n",
    "Alice has 3 apples and Bob has 5 apples. How many apples do they have together? 8.\n",
    "Les élèves lisent un manuel. 学生们读课本。 Ученики читают учебник. 🙂\n",
] * 8

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
CODE = st.lists(
    st.tuples(st.sampled_from(["", "    ", "        ", "\t", "\t\t", "   ", " "]),
              st.text(alphabet="abcxyz_()=+:.,'\"# 0123456789\t", max_size=30)),
    max_size=12,
).map(lambda lines: "".join(indent + body + "\n" for indent, body in lines))


@pytest.fixture(scope="module")
def tok() -> PhiTokenizer:
    return train_tokenizer(CORPUS, vocab_size=600, min_frequency=2)


def plain_bpe(texts, vocab_size):
    """The same byte-level BPE without the whitespace-run tokens (what indentation costs in GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    return t


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_round_trip_arbitrary_text(tok, s):
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(CODE)
def test_round_trip_code(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.decode(ids, skip_special_tokens=True) == s  # whitespace tokens are not "special"


def test_round_trip_edge_cases(tok):
    for s in ["", " ", "  ", " " * 33, " " * 70 + "x", "\t" * 20, "a \t \t b", "x  \n  \n", "\r\n\r\n  y",
              "\x00\x01\x7f", "e\u0301", "\ufeffbom", "trailing   ", "<|endoftext|>", "a<|endoftext|>  b"]:
        assert tok.decode(tok.encode(s)) == s, repr(s)
    assert tok.encode("<|endoftext|>") == [tok.eos_token_id]


def test_special_tokens(tok):
    assert tok.eos_token == "<|endoftext|>"
    assert tok.token_to_id("<|endoftext|>") == tok.eos_token_id == tok.bos_token_id == tok.pad_token_id
    assert tok.decode([tok.eos_token_id]) == "<|endoftext|>"
    assert tok.decode(tok.encode("hi") + [tok.eos_token_id], skip_special_tokens=True) == "hi"
    assert tok.eos_token_id not in tok.encode("def add(a, b):\n    return a + b\n")  # nothing added
    assert tok.chat_template is None


def test_sizes(tok):
    assert len(tok) == tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True)
    assert len(tok) <= 600
    assert model_vocab_size(tok) % 64 == 0 and 0 <= model_vocab_size(tok) - len(tok) < 64
    for ws in whitespace_tokens():
        assert tok.token_to_id(ws) is not None


def without_whitespace_tokens(tok):
    """`tok` with its whitespace-run tokens removed (only <|endoftext|> kept as an added token)."""
    from tokenizers import Tokenizer

    raw = json.loads(tok.backend.to_str())
    raw["added_tokens"] = [a for a in raw["added_tokens"] if a["content"] == EOS_TOKEN]
    return Tokenizer.from_str(json.dumps(raw))


def test_indentation_is_cheap(tok):
    stripped = without_whitespace_tokens(tok)
    plain = plain_bpe(CORPUS, len(tok))  # trained with runs of spaces visible to BPE, as GPT-2
    for indent in ("    ", "        ", " " * 12, " " * 32, "\t\t", "\t" * 4):
        assert len(tok.encode(indent)) == 1
        line = indent + "return x\n"
        assert tok.decode(tok.encode(line)) == stripped.decode(stripped.encode(line).ids) == line
        assert len(tok.encode(line)) < len(stripped.encode(line).ids), repr(indent)
    deep = "".join(" " * n + "x = 1\n" for n in (12, 16, 20, 24))  # deeper than anything in the corpus
    assert len(tok.encode(deep)) < len(plain.encode(deep).ids)
    block = "".join(CORPUS[:3])
    assert len(tok.encode(block)) < len(stripped.encode(block).ids)


def test_encode_batch_matches_encode(tok):
    texts = ["def f(x):\n    return x\n", "", "héllo  wörld"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_training_is_deterministic_and_hash_is_stable(tok, tmp_path):
    again = train_tokenizer(CORPUS, vocab_size=600, min_frequency=2)
    assert again.hash() == tok.hash()
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).hash() == tok.hash()
    other = train_tokenizer(CORPUS[:3], vocab_size=400, min_frequency=2)
    assert other.hash() != tok.hash()


def test_train_rejects_bad_input():
    with pytest.raises(PhiforgeError, match="too small"):
        train_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(PhiforgeError, match="empty corpus"):
        train_tokenizer([], vocab_size=600)


def test_save_loads_in_transformers_identically(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.chat_template = TEMPLATE
    try:
        tok.save(tmp_path)
    finally:
        tok.chat_template = None
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                    "special_tokens_map.json"}
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = CORPUS[:6] + ["    if x:\n\t\treturn  y  # done\n", "a . b , c ! ?", "  leading and trailing  "]
    for text in texts:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == text == tok.decode(ids)
    assert hf.eos_token == hf.bos_token == hf.pad_token == "<|endoftext|>"
    assert hf.eos_token_id == tok.eos_token_id
    assert len(hf) == len(tok)
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == TEMPLATE and loaded.encode(texts[-2]) == tok.encode(texts[-2])


# ---- a tokenizer.json like the one beside microsoft/phi-2 (CodeGen's: GPT-2 BPE + whitespace-run tokens) ----
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable bytes map to themselves, the rest above U+0100)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_phi_style_tokenizer(d):
    """tokenizer.json + tokenizer_config.json in microsoft/phi-2's format: GPT-2 byte vocab in GPT-2's order,
    a few merges, <|endoftext|> after the BPE vocab, then 30 space runs (31..2) and 8 tab runs (9..2) with
    normalized=true, as CodeGen added them; tokenizer_class CodeGenTokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("r", "e"), ("re", "t"), ("u", "r"), ("ur", "n"),
              ("ret", "urn"), ("Ġ", "x"), ("d", "e"), ("de", "f")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    t.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    t.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    t.add_special_tokens([AddedToken("<|endoftext|>", normalized=False, special=True)])
    t.add_tokens([AddedToken(" " * n, normalized=True) for n in range(31, 1, -1)]
                 + [AddedToken("\t" * n, normalized=True) for n in range(9, 1, -1)])
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": "<|endoftext|>", "clean_up_tokenization_spaces": True,
        "eos_token": "<|endoftext|>", "model_max_length": 2048, "tokenizer_class": "CodeGenTokenizer",
        "unk_token": "<|endoftext|>"}))
    return len(vocab)


def test_loads_phi_style_tokenizer_json(tmp_path):
    n_bpe = write_phi_style_tokenizer(tmp_path)
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    assert raw["model"]["type"] == "BPE" and raw["pre_tokenizer"]["type"] == "ByteLevel"
    assert len(raw["added_tokens"]) == 1 + 30 + 8
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_id == n_bpe  # like 50256: right after the BPE vocab
    assert len(tok) == n_bpe + 1 + 38  # like 50295
    assert tok.model_max_length == 2048
    code = "def f(x):\n    return the x\n\t\treturn  x\n"
    ids = tok.encode(code)
    assert tok.decode(ids) == code
    assert n_bpe + 1 + (31 - 4) in ids  # the 4-space token, as id 50284 in phi-2
    assert tok.token_to_id("    ") == n_bpe + 1 + (31 - 4)
    assert tok.id_to_token(tok.encode(" the")[0]) == "Ġthe"
    # transformers reads the same file the same way (its own CodeGenTokenizer class here)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(code)["input_ids"] == ids
    assert hf.eos_token_id == tok.eos_token_id
    # the file path itself also loads
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(code) == ids


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(PhiforgeError, match=str(tmp_path / "nope")):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(PhiforgeError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(PhiforgeError, match=f"{bad}: not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(PhiforgeError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)


def test_load_requires_eos(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(PhiforgeError, match="<\\|endoftext\\|>"):
        load_tokenizer(tmp_path)
