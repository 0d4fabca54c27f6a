"""MinHash-LSH: shingle hashing, signature Jaccard estimates, clustering and keep-lowest determinism."""

from __future__ import annotations

import numpy as np

from phiforge.data.curate.minhash import (
    LSHParams,
    MinHasher,
    clusters,
    estimated_jaccard,
    jaccard,
    minhash_signatures,
    near_duplicate_clusters,
    shingle_hashes,
)


def _doc(rng, n=200, vocab=3000):
    return " ".join(f"w{i}" for i in rng.integers(0, vocab, n))


def _edit(text, rng, k):
    words = text.split()
    for i in rng.choice(len(words), k, replace=False):
        words[i] = f"edit{rng.integers(1 << 30)}"
    return " ".join(words)


def test_shingles_ignore_case_and_whitespace_and_respect_doc_boundaries():
    sh = shingle_hashes(["The cat  sat\ton the mat", "the CAT sat on\nthe mat", "mat the on sat cat the"], 3)
    assert np.array_equal(sh.doc(0), sh.doc(1))
    assert len(sh.doc(0)) == 4  # 6 words -> 4 trigrams
    assert not set(sh.doc(0)) & set(sh.doc(2))
    # a doc's last word never forms a shingle with the next doc's first word
    two = shingle_hashes(["a b", "c d"], 2)
    assert len(two.doc(0)) == 1 and len(two.doc(1)) == 1
    short = shingle_hashes(["x y", "", "one two three four five six"], 5)
    assert list(np.diff(short.offsets)) == [1, 0, 2]


def test_signature_agreement_estimates_jaccard():
    rng = np.random.default_rng(0)
    base = _doc(rng, 300)
    pairs, truth = [], []
    texts = [base]
    for k in (5, 20, 60, 120):
        texts.append(_edit(base, rng, k))
    sh = shingle_hashes(texts, 5)
    sig = MinHasher(256, seed=3).signatures(sh)
    for j in range(1, len(texts)):
        pairs.append((0, j))
        truth.append(jaccard(sh.doc(0), sh.doc(j)))
    est = estimated_jaccard(sig, np.array(pairs))
    assert np.all(np.abs(est - np.array(truth)) < 0.1), (est, truth)
    assert truth[0] > truth[-1]


def test_near_duplicates_clustered_keep_lowest_index_deterministic():
    rng = np.random.default_rng(1)
    originals = [_doc(rng) for _ in range(40)]
    texts = list(originals)
    for i in range(0, 40, 4):  # light edits (J ~ 0.9) of every 4th doc, appended after all originals
        texts.append(_edit(originals[i], rng, 2))
    params = LSHParams(ngram=5, bands=20, rows=5, verify=0.5)
    sig = minhash_signatures(texts, params)
    root, pairs = near_duplicate_clusters(sig, params)
    for c, i in enumerate(range(0, 40, 4)):
        assert root[40 + c] == i
    assert np.array_equal(root[:40], np.arange(40))  # unrelated random docs stay apart
    root2, _ = near_duplicate_clusters(minhash_signatures(texts, params), params)
    assert np.array_equal(root, root2)


def test_union_find_transitive_chains():
    pairs = np.array([[7, 9], [5, 7], [1, 9], [3, 4], [8, 8]])
    assert clusters(10, pairs).tolist() == [0, 1, 2, 3, 3, 1, 6, 1, 8, 1]
    assert clusters(3, np.zeros((0, 2), dtype=np.int64)).tolist() == [0, 1, 2]


def test_empty_documents_are_never_near_duplicates():
    params = LSHParams()
    sig = minhash_signatures(["", "   ", "a b c d e f"], params)
    root, _ = near_duplicate_clusters(sig, params)
    assert root.tolist() == [0, 1, 2]
