"""The torch backends (native phiforge, transformers): exact log-likelihoods, packing and context sharing,
rolling windows, generation, the result cache in front of them."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


class ByteTok:
    """A byte tokenizer for the tiny vocab-256 model (id = byte value; 0 doubles as eos)."""

    eos_token_id = 0
    bos_token_id = None
    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i).decode("utf-8", errors="replace")


def reference_ll(model, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([(ctx + cont)[:-1]])  # the last token is only a target
    with torch.no_grad():
        lp = torch.log_softmax(model(ids)[0].float(), -1)
    return sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


REQS = [("Question: 2+2?\nAnswer:", " 4"), ("Question: 2+2?\nAnswer:", " five"), ("Question: 2+2?\nAnswer:", " 22 "),
        ("A much longer context that shares nothing ", "with the others"), ("", "empty context"),
        ("trailing space ", "moves"), ("x", "y")]


def test_native_matches_full_forward_and_is_batch_invariant(tiny_model):
    from phiforge.lm.phiforge_backend import PhiforgeLM

    lm1 = PhiforgeLM(tiny_model, ByteTok(), batch_size=1)
    lm8 = PhiforgeLM(tiny_model, ByteTok(), batch_size=8)
    one = lm1.loglikelihood(list(REQS))
    many = lm8.loglikelihood(list(REQS))
    for (c, x), a, b in zip(REQS, one, many):
        ctx, cont = lm1.encode_pair(c, x)
        ref = reference_ll(tiny_model, ctx, cont)
        assert a[0] == pytest.approx(ref, abs=1e-4)
        assert b[0] == pytest.approx(ref, abs=1e-4)
        assert a[1] == b[1]
    # single-request form of the interface
    assert lm8.loglikelihood(*REQS[0])[0] == pytest.approx(one[0][0], abs=1e-4)


def test_encode_pair_moves_trailing_space_and_empty_context_uses_prefix():
    from phiforge.lm.phiforge_backend import PhiforgeLM

    class M:
        class config:
            max_position_embeddings = 64

        class lm_head:
            weight = torch.zeros(1)

        def eval(self):
            return self

    lm = PhiforgeLM(M(), ByteTok())
    assert lm.encode_pair("ab ", "c") == (list(b"ab"), list(b" c"))
    assert lm.encode_pair("", "hi") == ([0], list(b"hi"))


def test_greedy_flag(tiny_model):
    from phiforge.lm.phiforge_backend import PhiforgeLM

    lm = PhiforgeLM(tiny_model, ByteTok())
    ctx = list(b"hello")
    with torch.no_grad():
        best = int(tiny_model(torch.tensor([ctx]))[0, -1].argmax())
    other = (best + 1) % 256
    res = lm.loglikelihood_tokens([(ctx, [best]), (ctx, [other])])
    assert res[0][1] is True and res[1][1] is False


def test_rolling_equals_sum_of_token_logprobs(tiny_model):
    from phiforge.lm.phiforge_backend import PhiforgeLM

    lm = PhiforgeLM(tiny_model, ByteTok())
    text = "rolling windows " * 20  # 320 bytes > the 128-token context: several windows
    got = lm.loglikelihood_rolling([text, "short"])
    short_ref = reference_ll(tiny_model, [0], list(b"short"))
    assert got[1] == pytest.approx(short_ref, abs=1e-4)
    # window by window reference: each window predicts its tokens from the preceding (at most 128) tokens
    toks = list(text.encode())
    full = [0] + toks
    ref = 0.0
    for s in range(0, len(toks), 128):
        cont = toks[s:s + 128]
        ctx = full[max(0, s + len(cont) - 128): s + 1]
        ref += reference_ll(tiny_model, ctx, cont)
    assert got[0] == pytest.approx(ref, abs=1e-3)


def test_cache_hit_on_rerun(tiny_model, tmp_path):
    from phiforge.lm.cache import CachedLM, ResultCache
    from phiforge.lm.phiforge_backend import PhiforgeLM

    calls = []

    class Counting(PhiforgeLM):
        def _loglikelihood(self, requests, on_result=None):
            calls.append(len(requests))
            return super()._loglikelihood(requests, on_result)

    lm = Counting(tiny_model, ByteTok(), identity="tiny-test")
    db = tmp_path / "cache.sqlite"
    c1 = CachedLM(lm, ResultCache(db))
    first = c1.loglikelihood(list(REQS))
    c1.cache.close()
    c2 = CachedLM(lm, ResultCache(db))
    second = c2.loglikelihood(list(REQS) + [("new", " request")])
    assert calls == [len(REQS), 1]  # only the new request reached the model
    assert c2.stats == {"hits": len(REQS), "misses": 1}
    assert [r[0] for r in second[:-1]] == [r[0] for r in first]
    # another model identity never reuses these entries
    other = CachedLM(Counting(tiny_model, ByteTok(), identity="other"), ResultCache(db))
    other.loglikelihood(list(REQS[:2]))
    assert other.stats["misses"] == 2


def test_hf_backend_left_padding_and_shared_context():
    transformers = pytest.importorskip("transformers")
    from phiforge.lm.hf import HFLM

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()

    class HFByteTok(ByteTok):
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": self.encode(text)}

    lm = HFLM(model, HFByteTok(), batch_size=8)
    got = lm.loglikelihood(list(REQS))
    for (c, x), (lp, _) in zip(REQS, got):
        ctx, cont = lm.encode_pair(c, x)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lps = torch.log_softmax(model(ids).logits[0].float(), -1)
        ref = sum(float(lps[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert lp == pytest.approx(ref, abs=1e-4)


def test_native_generate_until_stops(tiny_model):
    from phiforge.lm import GenRequest, Sampling
    from phiforge.lm.phiforge_backend import PhiforgeLM

    lm = PhiforgeLM(tiny_model, ByteTok(), batch_size=4)
    outs = lm.generate_until([GenRequest("abc", Sampling(max_new_tokens=8)),
                              GenRequest("a much longer prompt", Sampling(max_new_tokens=8))])
    single = lm.generate_until("abc", Sampling(max_new_tokens=8))
    assert outs[0] == single  # greedy: batching and padding do not change the text
    assert all(len(o.encode("utf-8", errors="ignore")) <= 8 * 4 for o in outs)


def _tiny_llama(attn: str = "sdpa"):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _plain(model, ctx, cont, hf):
    """log P(cont | ctx) and greedy flag from one unpadded full forward of ctx + cont (no packing, no batch)."""
    ids = torch.tensor([(ctx + cont)[:-1]])
    with torch.no_grad():
        logits = (model(ids).logits if hf else model(ids))[0].float()
    lps = torch.log_softmax(logits, -1)
    rows = range(len(ctx) - 1, len(ctx) - 1 + len(cont))
    return (sum(float(lps[r, t]) for r, t in zip(rows, cont)),
            all(int(logits[r].argmax()) == t for r, t in zip(rows, cont)))


# Multiple-choice shaped token requests: shared contexts with answers of different lengths (1 token included),
# plus a lone context; random ids so nothing depends on a tokenizer.
def _mc_requests(seed=1):
    g = torch.Generator().manual_seed(seed)
    ints = lambda n: torch.randint(2, 256, (n,), generator=g).tolist()  # noqa: E731
    reqs = []
    for c_len, answers in ((7, (1, 4, 9, 2)), (30, (3, 3, 12)), (1, (5,)), (12, (1, 1)), (50, (20, 6, 1, 8))):
        ctx = ints(c_len)
        reqs += [(ctx, ints(n)) for n in answers]
    return reqs


@pytest.mark.parametrize("backend", ["hf", "hf-eager", "native"])
@pytest.mark.parametrize("budget", [None, 40])  # 40 tokens: one row per batch, long groups split into rows
def test_packed_rows_equal_plain_path(backend, budget, tiny_model):
    from phiforge.lm.hf import HFLM
    from phiforge.lm.phiforge_backend import PhiforgeLM

    reqs = _mc_requests()
    if backend.startswith("hf"):
        model = _tiny_llama("eager" if backend == "hf-eager" else "sdpa")
        assert model.config._attn_implementation == ("eager" if backend == "hf-eager" else "sdpa")
        lm = HFLM(model, None, max_batch_tokens=budget)
    else:
        model = tiny_model
        lm = PhiforgeLM(model, ByteTok(), max_batch_tokens=budget)
    if budget:
        lm.max_length = 40  # the 50-token context + answers no longer fit one row: truncation + several rows
    got = lm.loglikelihood_tokens(list(reqs))
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        over = len(ctx) + len(cont) - (lm.max_length + 1)
        if over > 0:
            ctx = ctx[over:]
        ref_lp, ref_greedy = _plain(model, ctx, cont, backend.startswith("hf"))
        assert lp == pytest.approx(ref_lp, abs=1e-5)
        assert greedy == ref_greedy


def test_packed_layout_and_mask():
    from phiforge.lm.packed import block_mask, fill_rows, pack_segments, rows_to_tensors

    reqs = [([10, 11, 12], [20, 21]), ([10, 11, 12], [30]), ([10, 11, 12], [40, 41, 42]), ([50, 51], [60, 61])]
    segs = pack_segments({(10, 11, 12): [0, 1, 2], (50, 51): [3]}, reqs, max_length=64)
    assert [x.tokens for x in segs] == [[10, 11, 12, 20, 40, 41], [50, 51, 60]]
    assert segs[0].starts == [3, 4, 4]
    rows = fill_rows(segs, width=16)
    assert len(rows) == 1 and rows[0].offsets == [0, 6]  # both segments share one row
    ids, pos, seg, part = rows_to_tensors(rows)
    assert ids[0].tolist() == [10, 11, 12, 20, 40, 41, 50, 51, 60]
    assert pos[0].tolist() == [0, 1, 2, 3, 3, 4, 0, 1, 2]  # continuations restart at their context's length
    assert seg[0].tolist() == [0] * 6 + [1] * 3
    assert part[0].tolist() == [0, 0, 0, 1, 3, 3, 0, 0, 1]
    m = block_mask(seg, part)[0].int().tolist()
    assert m[5] == [1, 1, 1, 0, 1, 1, 0, 0, 0]  # answer 3 sees its context and itself, never answer 1
    assert m[3] == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert m[1] == [1, 1, 0, 0, 0, 0, 0, 0, 0]  # the context stays causal
    assert m[8] == [0, 0, 0, 0, 0, 0, 1, 1, 1]  # the second segment never sees the first
    # a too-small segment budget splits the answers over segments that each repeat the context
    split = pack_segments({(10, 11, 12): [0, 1, 2]}, reqs, max_length=5)
    assert [x.requests for x in split] == [[0, 1], [2]]
    assert all(x.length <= 5 for x in split)
    # rows never exceed their width
    assert [r.length for r in fill_rows(segs, width=6)] == [6, 3]
