"""Generation: greedy is token-identical to transformers; sampling, stopping and streaming behave as documented."""

from __future__ import annotations

import importlib.util
import io
import math

import pytest
import torch

from phiforge.generate import GenerationConfig, apply_repetition_penalty, filter_top_p, generate, generate_ids
from phiforge.model import Phi
from tests.conftest import tiny_config

VOCAB = 320


def spread_model(seed: int = 0, **overrides) -> Phi:
    """A random tiny Phi whose logits are spread over several units, so greedy argmax never sits on a near-tie
    (default init gives logits ~1e-2 apart, where fp32 reordering between implementations could flip it)."""
    torch.manual_seed(seed)
    model = Phi(tiny_config(vocab_size=VOCAB, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "layernorm" in name:
                p.normal_(1.0, 0.1)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:  # Linear weight (out, in): unit-variance outputs; lm_head a little hotter
                p.normal_(0.0, (3.0 if name.startswith("lm_head") else 1.0) / math.sqrt(p.shape[1]))
    return model.eval()


@pytest.fixture(scope="module")
def model_and_hf(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from phiforge.checkpoint import save_checkpoint

    model = spread_model()
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, hf


def hf_greedy(hf, prompts: list[list[int]], n: int, **kw) -> list[list[int]]:
    """transformers' greedy continuation of left-padded prompts (new tokens only)."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None, **kw)
    return out[:, T:].tolist()


def test_greedy_single_prompt_matches_transformers(model_and_hf):
    model, hf = model_and_hf
    prompt = [5, 17, 200, 33, 9, 120, 64]
    ours = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=24))
    assert ours == hf_greedy(hf, [prompt], 24)


def test_greedy_left_padded_batch_matches_transformers(model_and_hf):
    model, hf = model_and_hf
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (11, 3, 7)]
    ours = generate_ids(model, prompts, GenerationConfig(max_new_tokens=16), pad_token_id=0)
    assert ours == hf_greedy(hf, prompts, 16)
    # each row of the batch is what the prompt gets alone
    assert ours == [generate_ids(model, [p], GenerationConfig(max_new_tokens=16))[0] for p in prompts]


def test_repetition_penalty_matches_transformers(model_and_hf):
    model, hf = model_and_hf
    prompt = [7, 7, 100, 3, 250, 41]
    ours = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=20, repetition_penalty=1.5))
    assert ours == hf_greedy(hf, [prompt], 20, repetition_penalty=1.5)


def test_repetition_penalty_breaks_a_forced_repeat():
    model = spread_model()
    with torch.no_grad():
        model.lm_head.bias[42] = 30.0  # greedy now always says 42
    plain = generate_ids(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=8))[0]
    assert plain == [42] * 8
    penalised = generate_ids(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=8, repetition_penalty=1000.0))[0]
    assert penalised[0] == 42 and 42 not in penalised[1:]


def test_repetition_penalty_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_top_p(probs.log(), 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert filter_top_p(probs.log(), 1e-9).isfinite().sum() == 1  # the most likely token always survives


def test_sampling_is_seeded():
    model = spread_model()
    prompts = [[1, 2, 3], [9, 8]]

    def sample(seed, **kw):
        return generate_ids(model, prompts, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=seed, **kw))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(3, top_k=5, top_p=0.9) == sample(3, top_k=5, top_p=0.9)
    greedy = generate_ids(model, prompts, GenerationConfig(max_new_tokens=20))
    assert sample(4, top_k=1) == greedy
    assert sample(5, top_p=1e-9) == greedy


def test_max_new_tokens_and_context_limit():
    model = spread_model(max_position_embeddings=32)
    out = generate_ids(model, [[1, 2, 3], [4]], GenerationConfig(max_new_tokens=5))
    assert [len(o) for o in out] == [5, 5]
    assert generate_ids(model, [[1]], GenerationConfig(max_new_tokens=0)) == [[]]
    # the cache never outgrows the context: generation stops when it is full
    out = generate_ids(model, [[1] * 30], GenerationConfig(max_new_tokens=10))
    assert len(out[0]) == 3
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate_ids(model, [[1] * 33], GenerationConfig(max_new_tokens=1))


def test_eos_stops_one_row_while_others_continue():
    model = spread_model()
    prompts = [[10, 20, 30, 40], [77, 5]]
    free = generate_ids(model, prompts, GenerationConfig(max_new_tokens=12))
    # an eos that row 0 produces (at position > 0) but row 1 never does
    eos = next(t for t in free[0][1:] if t not in free[1])
    stopped = generate_ids(model, prompts, GenerationConfig(max_new_tokens=12, eos_token_id=eos))
    cut = free[0].index(eos) + 1
    assert cut < 12
    assert stopped[0] == free[0][:cut]  # eos is kept in the ids, nothing after it
    assert stopped[1] == free[1]
    ignored = generate_ids(model, prompts, GenerationConfig(max_new_tokens=12, eos_token_id=eos, ignore_eos=True))
    assert ignored == free


def test_on_token_streams_every_token_and_can_stop_a_row():
    model = spread_model()
    seen: list[tuple[int, int]] = []

    def on_token(row, tok):
        seen.append((row, tok))
        return row == 1 and sum(r == 1 for r, _ in seen) == 3  # stop row 1 after 3 tokens

    out = generate_ids(model, [[1, 2], [3, 4, 5]], GenerationConfig(max_new_tokens=6), on_token=on_token)
    assert [len(o) for o in out] == [6, 3]
    assert [t for r, t in seen if r == 0] == out[0] and [t for r, t in seen if r == 1] == out[1]


# ---- text layer -----------------------------------------------------------------------------------------------
class ByteBPE:
    """A small byte-level BPE tokenizer with the PhiTokenizer surface that generation uses."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        lines = ["def add(a, b):\n    return a + b\n", "The cat sat on the mat. The dog ate the log.",
                 "Textbooks are all you need; caf\u00e9 na\u00efve \u00fcber \u4f60\u597d"] * 20
        tok.train_from_iterator(lines, trainer)
        self.tok = tok
        self.eos_token_id = tok.token_to_id("<|endoftext|>")
        self.pad_token_id = self.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tok():
    return ByteBPE()


def test_text_generation_decodes_the_ids(tok):
    model = spread_model()
    cfg = GenerationConfig(max_new_tokens=15, ignore_eos=True)
    text = generate(model, tok, ["The cat"], cfg)[0]
    ids = generate_ids(model, [tok.encode("The cat")], cfg)[0]
    assert text == tok.decode(ids)


def test_stop_string_truncates_and_stops(tok):
    model = spread_model()
    cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    full = generate(model, tok, ["def add"], cfg)[0]
    stop = full[8:10]
    assert len(full) > 12 and stop.strip()
    expected = full[:full.find(stop)]
    cut = generate(model, tok, ["def add"], GenerationConfig(max_new_tokens=30, ignore_eos=True,
                                                            stop=["\x00never", stop]))[0]
    assert cut == expected
    # generation really stopped early: the same prefix took fewer tokens than the full 30
    assert len(tok.encode(cut)) < 30


def test_streaming_writes_the_same_text(tok):
    model = spread_model()
    full = generate(model, tok, ["The dog"], GenerationConfig(max_new_tokens=25, ignore_eos=True))[0]
    stop = full[10:13]
    buf = io.StringIO()
    text = generate(model, tok, ["The dog"], GenerationConfig(max_new_tokens=25, ignore_eos=True, stop=[stop]),
                    stream=buf)[0]
    assert buf.getvalue() == text + "\n"
    assert stop not in buf.getvalue()


def test_eos_ends_text_without_the_token(tok):
    model = spread_model()
    with torch.no_grad():
        model.lm_head.bias[tok.eos_token_id] = 50.0  # the first new token is eos
    assert generate(model, tok, ["The cat", "def"], GenerationConfig(max_new_tokens=10)) == ["", ""]


# ---- CLI ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("phiforge.tokenizer") is None, reason="phiforge.tokenizer not present")
def test_cli_generates_from_a_saved_checkpoint(tmp_path, capsys):
    from phiforge.checkpoint import save_checkpoint
    from phiforge.cli import main
    from phiforge.tokenizer import load_tokenizer, train_tokenizer

    texts = ["The cat sat on the mat.", "def add(a, b):\n    return a + b", "Textbooks are all you need."] * 30
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = spread_model()
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=tokenizer)
    tokenizer = load_tokenizer(tmp_path / "ckpt")
    code = main(["generate", "--model", str(tmp_path / "ckpt"), "--max-new-tokens", "8", "--no-stream",
                 "The cat", "def add"])
    out = capsys.readouterr()
    assert code == 0
    expected = generate(model, tokenizer, ["The cat", "def add"], GenerationConfig(max_new_tokens=8))
    for text in expected:
        assert text in out.out
    assert "tok/s" in out.err

    assert main(["generate", "--model", str(tmp_path / "ckpt"), "--max-new-tokens", "5", "The cat"]) == 0
    assert expected[0][:3] in capsys.readouterr().out


def test_cli_without_tokenizer_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("phiforge.commands.generate")
    from phiforge.checkpoint import save_checkpoint
    from phiforge.cli import main

    save_checkpoint(spread_model(), tmp_path / "bare")
    assert main(["generate", "--model", str(tmp_path / "bare"), "hello"]) == 2
    assert "tokenizer" in capsys.readouterr().err
