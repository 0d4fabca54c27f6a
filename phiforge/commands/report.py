"""Rebuild the report (report.html + report.md) of a `phiforge run` directory from the files its stages wrote."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory made by `phiforge run`")


def main(args: argparse.Namespace) -> int:
    from phiforge.report import build_report

    paths = build_report(args.run_dir)
    print(f"wrote {paths['html']} and {paths['markdown']}")
    return 0
