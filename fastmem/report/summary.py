"""README's results block, generated from committed evidence: `python -m fastmem.report.summary DEST`.

For every experiment folder DEST/<ID> (sweep.json with its claims, and the runs it names under DEST/runs), one table
row per claim with the judge's verdict (fastmem/report/judge.py) and its numbers. tests/report/test_results_committed.py
checks that README.md holds exactly this text between its `results:begin` and `results:end` markers, so no verdict in
the README is typed by hand.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from fastmem.errors import fail, run_cli
from fastmem.report.judge import Claim, judge_all
from fastmem.report.render import load_sweep, run_views

BEGIN, END = "<!-- results:begin (python -m fastmem.report.summary) -->", "<!-- results:end -->"


def experiment_folders(dest: Path) -> list[Path]:
    """DEST's experiment folders in protocol order (A–K, then the main job)."""
    folders = sorted(p.parent for p in dest.glob("*/sweep.json"))
    return sorted(folders, key=lambda p: (p.name == "MAIN", p.name))


def results_markdown(dest: Path, link_base: Path | None = None) -> str:
    """The verdict table of every experiment in DEST, with links to their reports (relative to `link_base`)."""
    lines = ["| exp. | claim | verdict | seeds | the judge's numbers |", "|---|---|---|---|---|"]
    for folder in experiment_folders(dest):
        plan, variants = load_sweep(folder)
        views = run_views(variants)
        for verdict in judge_all([Claim.from_dict(c) for c in plan.get("claims", [])], views):
            seeds = len(verdict.per_seed)
            detail = verdict.detail.replace("|", "/")
            link = Path(os.path.relpath(folder / "report.md", link_base)) if link_base else folder / "report.md"
            lines.append(f"| [{plan['experiment']}]({link.as_posix()}) | {verdict.claim.id}: "
                         f"{verdict.claim.statement} | **{verdict.verdict}** | {seeds} of {verdict.claim.min_seeds} | "
                         f"{detail} |")
    return "\n".join(lines)


def readme_block(dest: Path, link_base: Path | None = None) -> str:
    return f"{BEGIN}\n{results_markdown(dest, link_base)}\n{END}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmem.report.summary",
                                     description="README's results block (verdicts) from committed evidence.")
    parser.add_argument("dest", help="the evidence folder, e.g. results/fashion-mnist-cpu")
    parser.add_argument("--write-readme", default=None, metavar="README",
                        help="replace the block between the markers in this README instead of printing it")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    if not experiment_folders(dest):
        fail(f"{dest}: no experiment folders with sweep.json (python -m fastmem.experiments export OUT {dest})")
    block = readme_block(dest, Path(args.write_readme).resolve().parent if args.write_readme else Path.cwd())
    if args.write_readme is None:
        print(block)
        return 0
    readme = Path(args.write_readme)
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        fail(f"{readme}: no {BEGIN} … {END} markers to replace")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + block + rest.split(END, 1)[1])
    print(f"wrote the results block of {readme}")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
