"""Educational-value classifier: time to train the default (stdlib labels, MiniLM embeddings, CV of three
heads) and batched scoring throughput on CPU; prints the cross-validated metrics of the chosen head. No peer:
its table row states the scoring rate alone.

    flock /tmp/phiforge-bench.lock python bench/classifier.py [--docs 512 --batch-size 64 --threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from rows import row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=512, help="documents to score (stdlib units, repeated)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--retrain", action="store_true", help="train into a temporary dir even if cached")
    ap.add_argument("--quick", action="store_true", help="smoke test: 64 documents")
    args = ap.parse_args()
    if args.quick:  # explicit flags still win
        ap.set_defaults(docs=64)
        args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from phiforge.data.curate import classifier as C

    labels = C.load_labels()
    path = C.default_classifier_path()
    if args.retrain or not (path / "classifier.json").exists():
        path = tempfile.mkdtemp(prefix="phiforge-clf-") if args.retrain else path
        t0 = time.perf_counter()
        C.train_classifier(labels.texts, labels.scores, path, log=print)
        print(f"RESULT classifier_train_seconds {time.perf_counter() - t0:.1f} s")
    meta = json.loads((C.Path(path) / "classifier.json").read_text())
    cv = meta["cv"][meta["head"]]
    print(f"default classifier: head {meta['head']}, {meta['samples']} labels, CV folds {meta['cv']['_folds']}, "
          f"positives {meta['cv'].get('_positives')}, trained in {meta['train_seconds']}s "
          f"(embedding {meta['embed_seconds']}s)")
    print(json.dumps(meta["cv"], indent=1))
    clf = C.load_classifier(path)
    docs = (labels.texts * (args.docs // len(labels.texts) + 1))[: args.docs]
    clf.score(docs[: args.batch_size], batch_size=args.batch_size)  # warm-up: model load
    t0 = time.perf_counter()
    scores = clf.score(docs, batch_size=args.batch_size)
    dt = time.perf_counter() - t0
    print(f"scored {len(docs)} docs in {dt:.2f}s (batch {args.batch_size}, {args.threads} threads); "
          f"mean score {scores.mean():.2f}")
    print(f"RESULT classifier_cv_f1 {cv['f1']:.3f} f1")
    print(f"RESULT classifier_cv_accuracy {cv['accuracy']:.3f} accuracy")
    print(f"RESULT classifier_cv_roc_auc {cv['roc_auc']:.3f} auc")
    print(f"RESULT classifier_score_docs_per_s {len(docs) / dt:.1f} docs/s")
    row("educational-value classifier scoring (MiniLM embeddings)", "none (no peer)",
        f"batch {args.batch_size}, {args.threads} threads", len(docs) / dt, None, "docs/s", "no goal stated",
        note=f"CV f1 {cv['f1']:.3f}, ROC AUC {cv['roc_auc']:.3f}")


if __name__ == "__main__":
    main()
