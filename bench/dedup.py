"""Near-duplicate detection: phiforge's vectorised MinHash-LSH vs datasketch MinHashLSH, same parameters.

Corpus: random Zipfian-vocabulary documents plus planted near-duplicates (copies with k words replaced, so
their true 5-gram Jaccard spans ~0.5-1.0; the true Jaccard of every pair is measured on Python sets of
shingles, independently of either implementation). Both sides use 5-word shingles and 20 bands x 6 rows
(120 permutations); phiforge additionally verifies candidates by signature agreement >= --verify.

The peer runs the way datasketch's documentation says to hash many documents: `MinHash.generator`, which builds
the permutations once and copies them for every document (a fresh `MinHash(...)` per document regenerates
them, 1.5-1.7x slower with identical signatures). Both sides get the same warm-up (one pass over a different
corpus of the same size), run in one process on one core, and alternate round by round.
Reported: docs/s of each (median of alternating rounds), their ratio, recall on planted pairs with
J >= 0.8 and precision of flagged pairs (fraction truly >= 0.8, and >= 0.7).

    flock /tmp/phiforge-bench.lock python bench/dedup.py [--docs 3000 --copies 1500] [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rows import held_equal, row


def shingle_set(text: str, n: int) -> set:
    w = text.lower().split()
    return {tuple(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}


def true_j(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def make_corpus(n_docs: int, n_copies: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(20000)])
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    docs = [" ".join(rng.choice(vocab, rng.integers(150, 400), p=p)) for _ in range(n_docs)]
    planted = []
    for c in range(n_copies):
        src = int(rng.integers(n_docs))
        words = docs[src].split()
        # replacing k words changes up to 5k shingles: k spans J from ~1.0 down to ~0.5
        k = int(rng.integers(0, max(2, len(words) // 15)))
        for i in rng.choice(len(words), k, replace=False):
            words[i] = f"x{c}_{i}"
        docs.append(" ".join(words))
        planted.append((src, n_docs + c))
    return docs, planted


def run_phiforge(docs, ngram, bands, rows, verify):
    from phiforge.data.curate.minhash import LSHParams, minhash_signatures, near_duplicate_clusters

    params = LSHParams(ngram=ngram, bands=bands, rows=rows, verify=verify)
    t0 = time.perf_counter()
    sig = minhash_signatures(docs, params)
    root, pairs = near_duplicate_clusters(sig, params)
    dt = time.perf_counter() - t0
    return dt, root, {tuple(map(int, p)) for p in pairs}


def run_datasketch(docs, ngram, bands, rows):
    from datasketch import MinHash, MinHashLSH

    def shingles():
        for text in docs:
            w = text.lower().split()
            yield [" ".join(w[j:j + ngram]).encode() for j in range(max(1, len(w) - ngram + 1))]

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=bands * rows, params=(bands, rows))
    pairs = set()
    # the generator makes the permutations once and copies them per document (datasketch's bulk API)
    for i, m in enumerate(MinHash.generator(shingles(), num_perm=bands * rows, seed=1)):
        for j in lsh.query(m):
            pairs.add((min(i, j), max(i, j)))
        lsh.insert(i, m)
    return time.perf_counter() - t0, pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000, help="random base documents")
    ap.add_argument("--copies", type=int, default=1500, help="planted edited copies")
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--bands", type=int, default=20)
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--verify", type=float, default=0.75, help="phiforge: signature-agreement check")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed runs of each peer (median)")
    ap.add_argument("--quick", action="store_true", help="smoke test: a small corpus, one round")
    args = ap.parse_args()
    if args.quick:  # explicit flags still win
        ap.set_defaults(docs=300, copies=150, rounds=1)
        args = ap.parse_args()

    docs, planted = make_corpus(args.docs, args.copies)
    sets = [shingle_set(d, args.ngram) for d in docs]
    truth = {(a, b): true_j(sets[a], sets[b]) for a, b in planted}
    high = [p for p, j in truth.items() if j >= 0.8]
    print(f"{len(docs)} docs, {len(planted)} planted pairs, {len(high)} with J >= 0.8 "
          f"(J range {min(truth.values()):.2f}-{max(truth.values()):.2f})")

    # warm-up of both on a different corpus of the same size: imports, allocators, phiforge's cached powers
    # table, datasketch's hash objects (the steady state of a worker that processes shard after shard)
    warm = make_corpus(args.docs, args.copies, seed=1)[0]
    run_phiforge(warm, args.ngram, args.bands, args.rows, args.verify)
    run_datasketch(warm, args.ngram, args.bands, args.rows)
    held = held_equal(f"corpus ({len(docs)} docs), {args.ngram}-word shingles, {args.bands} bands x {args.rows} "
                      f"rows ({args.bands * args.rows} permutations), one process on one core, one warm-up pass "
                      f"each, {args.rounds} alternating rounds (median)")
    # rounds alternate the two peers so that load from other processes hits both alike; medians reported
    t_pfs, t_dss = [], []
    for _ in range(args.rounds):
        t_pf, root, pf_pairs = run_phiforge(docs, args.ngram, args.bands, args.rows, args.verify)
        t_ds, ds_pairs = run_datasketch(docs, args.ngram, args.bands, args.rows)
        t_pfs.append(t_pf)
        t_dss.append(t_ds)
        print(f"round: phiforge {t_pf:.3f}s  datasketch {t_ds:.3f}s")
    t_pf, t_ds = float(np.median(t_pfs)), float(np.median(t_dss))

    def precision(pairs, cut):
        if not pairs:
            return 0.0
        return float(np.mean([true_j(sets[a], sets[b]) >= cut for a, b in pairs]))

    pf_recall = float(np.mean([root[a] == root[b] for a, b in high]))
    ds_recall = float(np.mean([(a, b) in ds_pairs for a, b in high]))
    pf_rate, ds_rate = len(docs) / t_pf, len(docs) / t_ds
    print(f"phiforge:   {t_pf:.2f}s  {pf_rate:,.0f} docs/s  recall@0.8 {pf_recall:.3f}  flagged pairs "
          f"{len(pf_pairs)}  precision(J>=0.8) {precision(pf_pairs, 0.8):.3f}  (J>=0.7) {precision(pf_pairs, 0.7):.3f}")
    print(f"datasketch: {t_ds:.2f}s  {ds_rate:,.0f} docs/s  recall@0.8 {ds_recall:.3f}  flagged pairs "
          f"{len(ds_pairs)}  precision(J>=0.8) {precision(ds_pairs, 0.8):.3f}  (J>=0.7) {precision(ds_pairs, 0.7):.3f}")
    print(f"RESULT dedup_phiforge_docs_per_s {pf_rate:.0f} docs/s")
    print(f"RESULT dedup_datasketch_docs_per_s {ds_rate:.0f} docs/s")
    print(f"RESULT dedup_speedup_vs_datasketch {pf_rate / ds_rate:.2f} x")
    print(f"RESULT dedup_phiforge_recall_j08 {pf_recall:.3f} fraction")
    print(f"RESULT dedup_datasketch_recall_j08 {ds_recall:.3f} fraction")
    print(f"RESULT dedup_phiforge_precision_j08 {precision(pf_pairs, 0.8):.3f} fraction")
    print(f"RESULT dedup_datasketch_precision_j08 {precision(ds_pairs, 0.8):.3f} fraction")
    row("near-duplicate detection (MinHash-LSH)", "datasketch MinHashLSH",
        f"MinHash.generator (shared permutations), sha1, {args.bands}x{args.rows} bands, warm-up", pf_rate, ds_rate,
        "docs/s", "> 1x at equal recall", held=held,
        note=f"recall@0.8 phiforge {pf_recall:.3f}, datasketch {ds_recall:.3f}")


if __name__ == "__main__":
    main()
