"""Every bench in sequence, and one Markdown table of phiforge's performance against its peers.

    python bench/all.py                      # the full benches (an hour or more on 2 cores): the table's figures
    python bench/all.py --quick              # every bench at smoke-test size (~15 min on 2 busy cores): it runs,
                                             # the figures mean nothing
    python bench/all.py --only dedup,train   # a subset; --skip serve leaves some out

Each bench runs as its own subprocess (a crash or a timeout costs that bench's rows, not the table), with
`--quick` passed through; its output goes to --logs/<bench>.log. The table is made of the benches' `ROW {json}`
lines (bench/rows.py); their `held equal:` lines are listed under it, and every RESULT line goes to
--logs/results.json. The machine columns are measured here, before the first bench: CPU model, cores, read
bandwidth (a 1 GiB `sum`) and the fp32 (MKL and oneDNN) and bf16 matmul peaks. Run it on a quiet machine: the
benches interleave phiforge with its peer, which evens out load but does not remove it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# run order: cheap and independent first, so a quick run fails fast; serve (the longest) last
BENCHES = ("dedup", "train", "sandbox", "classifier", "synth", "eval", "eval_faithfulness", "promptbase", "grow",
           "decode", "serve", "finetune")


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
         "torch": torch.__version__,
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


def run_bench(name: str, quick: bool, timeout: float, log: Path) -> dict:
    """Run bench/<name>.py in its own process group; its rows, held-equal lines, RESULT lines and status."""
    cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), *(["--quick"] if quick else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            status = f"exit {proc.wait(timeout=timeout)}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the bench and whatever it started (servers, sandboxes)
            proc.wait()
            status = f"timed out after {timeout:.0f}s"
    out = {"name": name, "status": status, "seconds": time.perf_counter() - t0, "rows": [], "held": [],
           "results": {}, "skipped": None}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("ROW "):
            out["rows"].append(json.loads(line[4:]))
        elif line.startswith("held equal: "):
            out["held"].append(line[len("held equal: "):])
        elif line.startswith("RESULT "):
            parts = line.split(maxsplit=3)
            if len(parts) >= 3:
                out["results"][parts[1]] = " ".join(parts[2:])
        elif line.startswith("skipped: "):
            out["skipped"] = line[len("skipped: "):]
    return out


def fmt(x: float | None, unit: str = "") -> str:
    """A figure with three significant digits (percentages: one decimal), or a dash."""
    if x is None:
        return "—"
    s = f"{x:.1f}" if unit == "%" else (f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}")
    return f"{s} {unit}".strip()


def ratio_cell(r: dict) -> str:
    if r["ratio"] is None:
        return "—"
    return f"{r['ratio']:+.1f} pt" if r["ratio_unit"] == "pt" else f"{r['ratio']:.2f}x"


def markdown(runs: list[dict], machine: dict, date: str, command: str, quick: bool) -> str:
    """The table, the machine, what each bench held equal, and the notes of its rows."""
    cell = machine_short(machine)
    head = ["workload", "peer", "peer setting", "phiforge", "peer figure", "ratio", "goal", "machine", "date"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        rows = run["rows"]
        if not rows:  # a bench that failed, timed out or skipped still has its line in the table
            why = f"skipped: {run['skipped']}" if run["skipped"] else f"no figures ({run['status']})"
            lines.append(f"| {run['name']} | — | {why} | — | — | — | — | {cell} | {date} |")
            continue
        for r in rows:
            cells = [r["workload"], r["peer"], r["peer_setting"], fmt(r["ours"], r["unit"]),
                     fmt(r["theirs"], r["unit"]), ratio_cell(r), r["goal"], cell, date]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    m = machine
    onednn = f", oneDNN {num(m['fp32_onednn_gflops'])}" if "fp32_onednn_gflops" in m else ""
    out = [f"<!-- written by: {command} -->",
           "**Quick (smoke-test) run: sizes too small for the figures to mean anything.**\n" if quick else "",
           f"Machine: {m['cpu']}; {m['cores']} cores, torch {m['torch']} on {m['threads']} threads; read bandwidth "
           f"{m['read_gb_s']:.1f} GB/s (`sum` over {'256 MiB' if quick else '1 GiB'}); matmul peak (n=1024) fp32 "
           f"MKL {num(m['fp32_mkl_gflops'])}{onednn}, bf16 {num(m['bf16_gflops'])} GFLOP/s. Date {date}; "
           f"command `{command}`.", "", *lines, "", "What each comparison held equal:", ""]
    for run in runs:
        for h in run["held"]:
            out.append(f"- **{run['name']}**: {h}")
    notes = [(run["name"], r) for run in runs for r in run["rows"] if r.get("note")]
    if notes:
        out += ["", "Notes:", ""] + [f"- **{r['workload']}**: {r['note']}" for _, r in notes]
    status = [f"{run['name']} ({run['status']}, {run['seconds']:.0f}s)" for run in runs]
    out += ["", "Benches: " + ", ".join(status) + "."]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every bench at smoke-test size (a few minutes)")
    ap.add_argument("--only", help="comma-separated benches to run (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated benches to leave out")
    ap.add_argument("--out", help="Markdown file to write, '-' for stdout only (default: docs/performance-latest.md; "
                                  "with --quick runs/bench-all/performance-quick.md)")
    ap.add_argument("--logs", default="runs/bench-all", help="each bench's output and results.json go here")
    ap.add_argument("--timeout", type=float, help="seconds per bench (default 7200; with --quick 600)")
    args = ap.parse_args()

    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [n for n in names + [s for s in args.skip.split(",") if s] if n not in BENCHES]
    if unknown:
        ap.error(f"unknown bench {', '.join(unknown)}; the benches are {', '.join(BENCHES)}")
    names = [n for n in names if n not in args.skip.split(",")]
    timeout = args.timeout or (600.0 if args.quick else 7200.0)
    logs = ROOT / args.logs
    logs.mkdir(parents=True, exist_ok=True)
    command = "python bench/all.py " + " ".join(sys.argv[1:])
    date = time.strftime("%Y-%m-%d")
    sys.path.insert(0, str(ROOT))
    machine = measure_machine(args.quick)
    print(f"machine: {machine_short(machine)} ({machine['cpu']})", flush=True)
    runs = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", end=" ", flush=True)
        run = run_bench(name, args.quick, timeout, logs / f"{name}.log")
        runs.append(run)
        print(f"{run['status']}, {run['seconds']:.0f}s, {len(run['rows'])} rows"
              + (f" (skipped: {run['skipped']})" if run["skipped"] else ""), flush=True)
    table = markdown(runs, machine, date, command.strip(), args.quick)
    (logs / "results.json").write_text(json.dumps({"machine": machine, "date": date, "command": command,
                                                   "runs": runs}, indent=1))
    print("\n" + table)
    out = args.out or ("runs/bench-all/performance-quick.md" if args.quick else "docs/performance-latest.md")
    if out != "-":
        path = ROOT / out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0 if all(r["status"] == "exit 0" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
