"""Train or apply the educational-value classifier (embeddings + a scikit-learn head chosen by CV).

  phiforge classifier train [--labels FILE] [--embedder minilm|DIR|hf:DIR|phiforge:DIR] [--out DIR]
  phiforge classifier score --model DIR|default --in GLOB [--out FILE]

Without --labels, `train` uses the shipped references to standard-library units scored with the rubric
(the code is read from this interpreter's library). It prints the cross-validated F1 and accuracy of each
head and saves the best as a small artefact directory that `curate` loads (step `edu`, `classifier: DIR`).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="fit the head on labelled samples and save the artefact")
    t.add_argument("--labels", default=None,
                   help="labels JSON/JSONL: {text, score} records or stdlib references (default: shipped)")
    t.add_argument("--embedder", default="minilm",
                   help="minilm (default, offline), a sentence-transformers dir, hf:<dir> or phiforge:<dir>")
    t.add_argument("--out", default=None, help="artefact directory (default: the cached default classifier)")
    t.add_argument("--threshold", type=float, default=3.0, help="keep/drop decision: score >= threshold")
    t.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    t.add_argument("--seed", type=int, default=0, help="random seed for folds and forests")
    s = sub.add_parser("score", help="score records with a trained artefact")
    s.add_argument("--model", default="default", help="artefact directory, or 'default'")
    s.add_argument("--in", dest="inputs", nargs="+", required=True, help="input glob(s) of .jsonl/.parquet")
    s.add_argument("--text-field", default="text", help="record field holding the text")
    s.add_argument("--out", default=None, help="write JSONL {src, score} here (default: stdout)")
    s.add_argument("--batch-size", type=int, default=64, help="texts per embedding batch")


def main(args: argparse.Namespace) -> int:
    from phiforge.data.curate import classifier as C

    if args.action == "train":
        labels = C.load_labels(args.labels)
        out = args.out or C.default_classifier_path()
        print(f"{len(labels.texts)} labelled samples from {labels.source} ({labels.skipped} skipped)")
        meta = C.train_classifier(labels.texts, labels.scores, out, embedder=args.embedder,
                                  threshold=args.threshold, folds=args.folds, seed=args.seed,
                                  extra_meta={"labels": labels.source, "skipped": labels.skipped})
        print(json.dumps({"artefact": str(out), "head": meta["head"], "cv": meta["cv"],
                          "train_seconds": meta["train_seconds"]}, indent=2))
        return 0
    from phiforge.atomic import atomic_open
    from phiforge.data.curate.shards import Record, expand_inputs, read_records

    path = C.ensure_default_classifier() if args.model == "default" else args.model
    clf = C.load_classifier(path)
    recs = [r for f in expand_inputs(args.inputs) for r in read_records(f, args.text_field) if isinstance(r, Record)]
    scores = clf.score([r.data[args.text_field] for r in recs], batch_size=args.batch_size)
    lines = [json.dumps({"src": r.src, "score": round(float(s), 4)}) for r, s in zip(recs, scores)]
    if args.out:
        with atomic_open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + ("\n" if lines else ""))
    else:
        print("\n".join(lines))
    return 0
