"""Every bench in sequence, and one Markdown table of phiforge's performance against its peers.

    python bench/all.py --plan                         # each bench's expected time at full size; runs nothing
    python bench/all.py                                # every bench at full size (hours on 2 cores)
    python bench/all.py --only dedup,train --merge docs/performance.md
                                                       # some benches; their lines in the table replaced, the rest kept
    python bench/all.py --quick                        # every bench at smoke-test size: it runs, the figures mean nothing

Each bench runs as its own subprocess (a crash or a timeout costs that bench's rows, not the table), with
`--quick` passed through; its output goes to --logs/<bench>.log, and its RESULT lines to --logs/results.json
(each bench's latest run).
The table is made of the benches' `ROW {json}` lines (bench/rows.py); their `held equal:` lines and the rows'
notes are listed under it, then one line per bench saying when, on what machine and by which command its rows
were measured. The machine is measured here, before the first bench: CPU model, cores, read bandwidth (a 1 GiB
`sum`) and the fp32 (MKL and oneDNN) and bf16 matmul peaks; every row carries its own machine and date columns,
so a table built in parts from runs on different days stays honest about where each figure comes from.

--merge FILE updates the table block of FILE (between the `bench/all.py table` markers; appended if FILE has
none): the benches of this run that exited 0 with rows replace their own lines, every other bench's lines stay as
they were, and a bench not measured yet shows one placeholder row. A bench that failed, timed out or skipped
keeps its previous lines (the run says so). Quick figures are never merged into docs/.

Run it on a quiet machine: the benches interleave phiforge with its peer, which evens out load but does not
remove it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# run order: cheap and independent first, so a quick run fails fast; the longest last
BENCHES = ("dedup", "train", "sandbox", "classifier", "synth", "eval", "eval_faithfulness", "promptbase", "grow",
           "decode", "finetune", "serve", "laptop")
# arguments a bench always gets from here: eval also times what a user waits for (model load + scoring)
EXTRA_ARGS = {"eval": ["--end-to-end"]}
# Expected minutes of each bench at full size on a quiet 2-core machine: estimates (good to about 2x) from the
# quick runs' times on a busy machine scaled by the full settings' work (items, steps, tokens, model FLOPs, rounds).
# `--plan` shows instead the time of a bench's last full-size run recorded in the --merge file, when there is one.
FULL_MINUTES = {"dedup": 2, "train": 5, "sandbox": 2, "classifier": 3, "synth": 12, "eval": 10,
                "eval_faithfulness": 12, "promptbase": 20, "grow": 40, "decode": 5, "finetune": 15, "serve": 35,
                "laptop": 40}
# what a first run costs on top (caches under ~/.cache/phiforge, kept for later runs)
FIRST_RUN = {"laptop": "llama.cpp built from source (~60 min on 2 cores) and the phi-2 weights written and exported "
                        "(~2 min, 10 GB)"}
QUICK_TIMEOUT = {"laptop": 3600.0}  # its first quick run builds llama.cpp too

BEGIN = "<!-- bench/all.py table: begin (python bench/all.py --merge FILE replaces the lines of the benches it ran) -->"
END = "<!-- bench/all.py table: end -->"
HEAD = ["bench", "workload", "peer", "peer setting", "phiforge", "peer figure", "ratio", "goal", "machine", "date"]
HELD = "What each comparison held equal:"
NOTES = "Notes:"
RUNS = "Runs (each bench's latest: status, time, date, machine, command):"
PLACEHOLDER = "not yet measured on a quiet machine"
PARTS = ("rows", "held", "notes", "runs")


# ---- the machine ------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name with its x86 family/model and widest vector ISA (a VM may mask the name)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    isa = next((f for f in ("avx512f", "avx2", "avx", "neon", "asimd") if f in flags), "")
    fam = f"family {info['cpu family']} model {info['model']}" if "cpu family" in info else ""
    return ", ".join(x for x in (name, fam, isa.upper()) if x)


def read_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Bytes/s of `sum()` over an nbytes fp32 tensor (read-only traffic, like weight streaming), best of reps."""
    import torch

    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def matmul_peak(fn, n: int, seconds: float) -> float:
    """FLOP/s of fn(), an n x n x n matmul, best over `seconds` of repeated runs."""
    fn()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def measure_machine(quick: bool) -> dict:
    """CPU model, cores, torch threads, read bandwidth and matmul peaks (GFLOP/s) of this machine, now."""
    import torch

    from phiforge.train import onednn

    n, sec = 1024, 0.3 if quick else 1.5
    a, b = torch.randn(n, n), torch.randn(n, n)
    ah, bh = a.bfloat16(), b.bfloat16()
    m = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
         "torch": torch.__version__, "bandwidth_mib": 256 if quick else 1024,
         "read_gb_s": read_bandwidth((256 if quick else 1024) << 20) / 1e9,
         "fp32_mkl_gflops": matmul_peak(lambda: torch.mm(a, b), n, sec) / 1e9,
         "bf16_gflops": matmul_peak(lambda: torch.mm(ah, bh), n, sec) / 1e9}
    if onednn.available():
        m["fp32_onednn_gflops"] = matmul_peak(lambda: onednn.matmul_nn(a, b), n, sec) / 1e9
    return m


def num(x: float) -> str:
    """A machine figure: whole numbers, two significant digits below 10 (bf16 on a CPU without bf16 units)."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def machine_short(m: dict) -> str:
    """The machine in one table cell."""
    fp32 = max(m["fp32_mkl_gflops"], m.get("fp32_onednn_gflops", 0.0))
    return (f"{m['cpu'].split(',')[0]}, {m['cores']} cores, {num(m['read_gb_s'])} GB/s, "
            f"{num(fp32)} / {num(m['bf16_gflops'])} GFLOP/s fp32 / bf16")


def machine_long(m: dict) -> str:
    """The machine in one sentence: everything measure_machine found."""
    onednn = f", oneDNN {num(m['fp32_onednn_gflops'])}" if "fp32_onednn_gflops" in m else ""
    return (f"{m['cpu']}; {m['cores']} cores, torch {m['torch']} on {m['threads']} threads; read bandwidth "
            f"{m['read_gb_s']:.1f} GB/s (`sum` over {m.get('bandwidth_mib', 1024)} MiB); matmul peak (n=1024) fp32 "
            f"MKL {num(m['fp32_mkl_gflops'])}{onednn}, bf16 {num(m['bf16_gflops'])} GFLOP/s")


# ---- one bench ----------------------------------------------------------------------------------------------------
def parse_log(text: str) -> dict:
    """A bench's output -> its rows, held-equal lines, RESULT lines and skip reason; `bad` counts ROW lines that
    could not be read (a torn line must cost that row, not the table)."""
    out: dict = {"rows": [], "held": [], "results": {}, "skipped": None, "bad": 0}
    for line in text.splitlines():
        if line.startswith("ROW "):
            try:
                r = json.loads(line[4:])
                if not all(k in r for k in ("workload", "peer", "peer_setting", "ours", "theirs", "unit", "ratio")):
                    raise ValueError("missing keys")
            except ValueError:
                out["bad"] += 1
                continue
            out["rows"].append(r)
        elif line.startswith("held equal: "):
            out["held"].append(line[len("held equal: "):])
        elif line.startswith("RESULT "):
            parts = line.split(maxsplit=2)
            if len(parts) == 3:
                out["results"][parts[1]] = parts[2]
        elif line.startswith("skipped: "):
            out["skipped"] = line[len("skipped: "):]
    return out


def run_bench(name: str, quick: bool, timeout: float, log: Path) -> dict:
    """Run bench/<name>.py in its own process group; its rows, held-equal lines, RESULT lines and status."""
    cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), *EXTRA_ARGS.get(name, []),
           *(["--quick"] if quick else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            status = f"exit {proc.wait(timeout=timeout)}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the bench and whatever it started (servers, sandboxes, workers)
            proc.wait()
            status = f"timed out after {timeout:.0f}s"
    out = {"name": name, "status": status, "seconds": time.perf_counter() - t0,
           **parse_log(log.read_text(errors="replace"))}
    if out["bad"]:
        out["status"] += f", {out['bad']} unreadable ROW lines"
    return out


def succeeded(run: dict) -> bool:
    """Whether a run's rows may replace a bench's previous lines: it exited 0 and gave rows, all readable."""
    return run["status"] == "exit 0" and bool(run["rows"])


# ---- the table block ----------------------------------------------------------------------------------------------
def fmt(x: float | None, unit: str = "") -> str:
    """A figure with three significant digits (percentages: one decimal), or a dash."""
    if x is None:
        return "—"
    s = f"{x:.1f}" if unit == "%" else (f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}")
    return f"{s} {unit}".strip()


def ratio_cell(r: dict) -> str:
    """`2.50x`, `1.20x (lower is better)`, `+1.5 pt` or `+0.31 points (...)`: the ratio in its own unit."""
    x, unit = r["ratio"], r.get("ratio_unit") or "x"
    if x is None:
        return "—"
    if unit == "pt":
        return f"{x:+.1f} pt"
    if unit.startswith("x"):
        return f"{x:.2f}{unit}"
    return f"{x:+.2f} {unit}"


def cells(values: list[str]) -> str:
    return "| " + " | ".join(v.replace("|", "\\|").replace("\n", " ") for v in values) + " |"


def bench_lines(run: dict, machine: dict, date: str, command: str, quick: bool) -> dict[str, list[str]]:
    """One bench's lines in each part of the block (rows, held, notes, runs), from its run."""
    name, mcell = run["name"], machine_short(machine)
    when = f"{date} (quick)" if quick else date
    out: dict[str, list[str]] = {p: [] for p in PARTS}
    for r in run["rows"]:
        out["rows"].append(cells([name, r["workload"], r["peer"], r["peer_setting"], fmt(r["ours"], r["unit"]),
                                  fmt(r["theirs"], r["unit"]), ratio_cell(r), r.get("goal", ""), mcell, when]))
        if r.get("note"):
            out["notes"].append(f"- **{name}**: *{r['workload']}*: {r['note']}")
    if not run["rows"]:  # a bench that failed, timed out or skipped still has its line in the table
        why = f"skipped: {run['skipped']}" if run["skipped"] else f"no figures ({run['status']})"
        out["rows"].append(cells([name, "—", "—", why, "—", "—", "—", "—", mcell, when]))
    out["held"] = [f"- **{name}**: {h}" for h in dict.fromkeys(run["held"])]  # once each, in order
    size = "quick size, figures meaningless" if quick else "full size"
    out["runs"] = [f"- **{name}**: {run['status']} in {run['seconds']:.0f} s on {date} ({size}); "
                   f"{machine_long(machine)}; `{command}`"]
    return out


def placeholder_lines(name: str) -> dict[str, list[str]]:
    return {"rows": [cells([name, PLACEHOLDER, "—", "—", "—", "—", "—", "—", "—", "—"])], "held": [], "notes": [],
            "runs": []}


_ITEM = re.compile(r"^- \*\*([\w.-]+)\*\*: ")


def parse_block(block: str) -> dict[str, dict[str, list[str]]]:
    """The lines of each bench in a table block written by render_block (placeholders left out)."""
    out: dict[str, dict[str, list[str]]] = {}
    part = "rows"
    for line in block.splitlines():
        s = line.strip()
        if s in (HELD, NOTES, RUNS):
            part = {HELD: "held", NOTES: "notes", RUNS: "runs"}[s]
            continue
        if part == "rows" and s.startswith("|"):
            first = s.strip("|").split("|")[0].strip().strip("`")
            if first in ("bench", "") or set(first) <= set("-: ") or PLACEHOLDER in s:
                continue  # the header, the separator row, a placeholder
            out.setdefault(first, {p: [] for p in PARTS})["rows"].append(s)
        elif part != "rows" and (m := _ITEM.match(s)):
            out.setdefault(m.group(1), {p: [] for p in PARTS})[part].append(s)
    return out


def render_block(sections: dict[str, dict[str, list[str]]], placeholders: bool) -> str:
    """The table block: every bench's lines in BENCHES order (then any other bench, as found); with
    placeholders, one placeholder row for each bench of BENCHES that has no lines."""
    names = [n for n in BENCHES if n in sections or placeholders] + [n for n in sections if n not in BENCHES]
    sec = {n: sections.get(n) or placeholder_lines(n) for n in names}
    out = [BEGIN, "", cells(HEAD), "|" + "---|" * len(HEAD)]
    out += [line for n in names for line in sec[n]["rows"]]
    for title, part in ((HELD, "held"), (NOTES, "notes"), (RUNS, "runs")):
        items = [line for n in names for line in sec[n][part]]
        if items:
            out += ["", title, "", *items]
    return "\n".join(out + ["", END]) + "\n"


def split_doc(doc: str) -> tuple[str, str | None, str]:
    """(text before the block, the block or None, text after it)."""
    i = doc.find(BEGIN.split(" (")[0])
    j = doc.find(END, i) if i >= 0 else -1
    if i < 0 or j < 0:
        return doc, None, ""
    return doc[:i], doc[i:j + len(END)], doc[j + len(END):].lstrip("\n")


def merge(doc: str, runs: list[dict], lines: dict[str, dict[str, list[str]]]) -> tuple[str, list[str]]:
    """doc with the lines of each succeeded run replacing that bench's; the others kept. Returns the new text and
    one message per bench whose previous lines were kept."""
    before, block, after = split_doc(doc)
    sections = parse_block(block) if block else {}
    kept = []
    for run in runs:
        if succeeded(run):
            sections[run["name"]] = lines[run["name"]]
        else:
            had = "its previous lines" if run["name"] in sections else "its placeholder"
            why = f"skipped: {run['skipped']}" if run["skipped"] else run["status"]
            kept.append(f"{run['name']}: {why}; kept {had}")
    new_block = render_block(sections, placeholders=True)
    if block is None:
        before = before.rstrip("\n") + "\n\n" if before.strip() else ""
    return before + new_block + ("\n" + after if after else ""), kept


def recorded_minutes(doc: str) -> dict[str, tuple[float, str]]:
    """Minutes and date of each bench's last full-size run recorded in a merged file's block."""
    _, block, _ = split_doc(doc)
    out = {}
    for name, sec in (parse_block(block) if block else {}).items():
        for line in sec["runs"]:
            m = re.search(r": exit 0 in (\d+) s on (\S+) \(full size\)", line)
            if m:
                out[name] = (int(m.group(1)) / 60, m.group(2))
    return out


def plan(names: list[str], recorded: dict[str, tuple[float, str]]) -> str:
    """Each bench's expected minutes at full size (measured where recorded, else the estimate) and the total."""
    lines, total = [], 0.0
    for n in names:
        if n in recorded:
            mins, how = recorded[n][0], f"its full run on {recorded[n][1]}"
        else:
            mins, how = FULL_MINUTES[n], "estimate"
        total += mins
        first = f"; first run adds {FIRST_RUN[n]}" if n in FIRST_RUN else ""
        lines.append(f"  {n:<18} ~{mins:4.0f} min ({how}{first})")
    return "\n".join(lines + [f"  {'total':<18} ~{total:4.0f} min ({total / 60:.1f} h) on a quiet 2-core machine"])


def write_results(path: Path, runs: list[dict]) -> None:
    """Each bench's latest run (its RESULT lines, rows, status, machine, date, command) in one JSON file: this
    run's benches replace their own entries, the others stay, as in a merged table."""
    try:
        old = json.loads(path.read_text()).get("runs", [])
    except (OSError, ValueError, AttributeError):
        old = []
    by_name = {r["name"]: r for r in old if isinstance(r, dict) and "name" in r and "machine" in r}
    by_name.update({r["name"]: r for r in runs})
    path.write_text(json.dumps({"runs": list(by_name.values())}, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every bench at smoke-test size (tens of minutes)")
    ap.add_argument("--only", metavar="B,B", help=f"comma-separated benches to run (default: all: {','.join(BENCHES)})")
    ap.add_argument("--skip", metavar="B,B", default="", help="comma-separated benches to leave out")
    ap.add_argument("--merge", metavar="FILE", help="Markdown file whose table block gets this run's rows, the other "
                                                    "benches' kept (paths: relative to the repository)")
    ap.add_argument("--plan", action="store_true", help="print each bench's expected time at full size and stop")
    ap.add_argument("--out", help="Markdown file for this run's own table, '-' for stdout only (default: "
                                  "<logs>/performance.md; with --quick <logs>/performance-quick.md)")
    ap.add_argument("--logs", default="runs/bench-all", help="each bench's output and results.json go here")
    ap.add_argument("--timeout", type=float, help="seconds per bench (default: 3x its expected time, at least 2 h; "
                                                  "with --quick 600, laptop 3600)")
    args = ap.parse_args()

    names = [n for n in args.only.split(",") if n] if args.only else list(BENCHES)
    skip = [s for s in args.skip.split(",") if s]
    unknown = [n for n in names + skip if n not in BENCHES]
    if unknown:
        ap.error(f"unknown bench {', '.join(unknown)}; the benches are {', '.join(BENCHES)}")
    names = [n for n in dict.fromkeys(names) if n not in skip]
    merge_path = (ROOT / args.merge).resolve() if args.merge else None
    if merge_path and args.quick and merge_path.is_relative_to(ROOT / "docs"):
        ap.error(f"--quick figures mean nothing and are not merged into {args.merge}; merge them into a file "
                 f"outside docs/, or drop --quick")
    times_from = merge_path or ROOT / "docs" / "performance.md"  # where the lead's full runs are recorded
    recorded = recorded_minutes(times_from.read_text()) if times_from.exists() else {}
    if args.plan or not args.quick:
        print("expected at full size:\n" + plan(names, recorded), flush=True)
    if args.plan:
        return 0

    logs = ROOT / args.logs
    logs.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/all.py", *sys.argv[1:]])
    date = time.strftime("%Y-%m-%d")
    sys.path.insert(0, str(ROOT))
    machine = measure_machine(args.quick)
    print(f"machine: {machine_long(machine)}", flush=True)
    runs = []
    for i, name in enumerate(names, 1):
        timeout = args.timeout or (QUICK_TIMEOUT.get(name, 600.0) if args.quick
                                   else max(7200.0, 3 * 60 * FULL_MINUTES[name]))
        print(f"[{i}/{len(names)}] {name} ...", end=" ", flush=True)
        run = run_bench(name, args.quick, timeout, logs / f"{name}.log")
        runs.append(run)
        print(f"{run['status']}, {run['seconds']:.0f}s, {len(run['rows'])} rows"
              + (f" (skipped: {run['skipped']})" if run["skipped"] else ""), flush=True)
    write_results(logs / "results.json", [{**r, "machine": machine, "date": date, "command": command,
                                           "quick": args.quick} for r in runs])
    lines = {run["name"]: bench_lines(run, machine, date, command, args.quick) for run in runs}
    head = ["**Quick (smoke-test) run: sizes too small for the figures to mean anything.**\n"] if args.quick else []
    table = "\n".join(head) + render_block(lines, placeholders=False)
    print("\n" + table)
    out = args.out or str(Path(args.logs) / ("performance-quick.md" if args.quick else "performance.md"))
    if out != "-":
        path = ROOT / out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)
        print(f"wrote {out}")
    if merge_path:
        text, kept = merge(merge_path.read_text() if merge_path.exists() else "", runs, lines)
        merge_path.parent.mkdir(parents=True, exist_ok=True)
        merge_path.write_text(text)
        print(f"merged {len(runs) - len(kept)} benches into {args.merge}"
              + "".join(f"\n  {k}" for k in kept), flush=True)
    return 0 if all(succeeded(r) or r["skipped"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
