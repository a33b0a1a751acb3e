"""Is `--precision auto` on a CPU stable? N fresh decisions, each in a new process with an empty cache, optionally while
other processes spin every core; prints each decision with its measured ratios and writes JSON.

    python benchmarks/precision_decision.py --decisions 10 --load 2   # 2 spinning processes beside it
    python benchmarks/precision_decision.py --cpuinfo fake_cpuinfo    # a CPU that declares other flags

The decision is fastmem/cpu_precision.py's: fp32 without native bf16; else the cpu scale's own training step timed in
interleaved fp32/bf16 rounds, bf16 iff the median ratio ≥ 1.25×.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, machine_label  # noqa: E402

CODE = "from fastmem.cpu_precision import cpu_precision_choice as c; print(c().to_env())"


def _spin(stop: float) -> None:
    x = 0
    while time.time() < stop:
        x += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=10)
    parser.add_argument("--load", type=int, default=2, help="spinning processes beside the decisions (0 = quiet)")
    parser.add_argument("--cpuinfo", default=None, help="a file read instead of /proc/cpuinfo ($FASTMEM_CPUINFO)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "precision_decision-cpu.json"))
    args = parser.parse_args()
    spinners = [mp.Process(target=_spin, args=(time.time() + 3600,)) for _ in range(args.load)]
    for spinner in spinners:
        spinner.start()
    rows = []
    try:
        for number in range(args.decisions):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "XDG_CACHE_HOME": cache}
                env.pop("FASTMEM_CPU_PRECISION", None)
                if args.cpuinfo:
                    env["FASTMEM_CPUINFO"] = args.cpuinfo
                started = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
                choice = json.loads(out.stdout)
                rows.append({"decision": choice["precision"], "reason": choice["reason"],
                             "seconds": round(time.perf_counter() - started, 2), "load_average": os.getloadavg()[0]})
                print(f"{number + 1:>2}: {choice['precision']}  ({rows[-1]['seconds']} s, load "
                      f"{rows[-1]['load_average']:.1f})  {choice['reason']}", flush=True)
    finally:
        for spinner in spinners:
            spinner.terminate()
    decisions = {row["decision"] for row in rows}
    print(f"\n{machine_label(describe_machine())}\n{len(rows)} fresh decisions, {args.load} spinning processes beside them: "
          f"{'all ' + decisions.pop() if len(decisions) == 1 else 'DIFFERENT: ' + ', '.join(sorted(decisions))}")
    Path(args.out).write_text(json.dumps({"machine": machine_label(describe_machine()), "load_processes": args.load, "rows": rows},
                                         indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
