"""Linear probe on CPU: ours (fastmem/probe/linear.py) against scikit-learn LogisticRegression, same protocol.

Claim checked (issue 23): the whole protocol — 5 λ fits on a seeded stratified 80 % with held-out
accuracy on the other 20 %, then a refit on all rows with the chosen λ — takes ours <= 10 s on
2,000 x 256 float32 features of 10 classes on 2 cores.

Features: a Gaussian random projection (784 -> 256, seed 0) of 3,000 Fashion-MNIST training images'
pixels (2,000 fit rows, 1,000 queries for accuracy); Gaussian clusters with --synthetic or when the
dataset is not installed. scikit-learn runs the same protocol: the same split (`heldout_split`), our
grid mapped to C = 1/(λ·n) (`sklearn_C`), the same selection rule and warm starts, lbfgs on the same
row-normalised float64 features; once at our tolerance (max |grad| <= 1e-6 on the mean objective, which
is how sklearn scales its own) and once with its defaults (tol 1e-4, max_iter 100, which stop early).
Rounds are interleaved, the best of `--repeats` kept (a row over SLOW_SECONDS runs once).
OMP_WAIT_POLICY=PASSIVE as in knn.py (it does not reach OpenBLAS's own pthreads, which sklearn's
multi-thread rows use).

    python benchmarks/linear_probe.py          # ~2 min on a busy 2-core machine

Measured (AMD EPYC, 2 cores; torch 2.14.1, scikit-learn 1.9.1), machine busy with training jobs (load
average 7.3 -> 8.6 on 2 cores), best of 3, results/linear_probe-cpu.json:
    ours, 1 thread (default) 2.37 s | ours, 2 threads 2.74 | sklearn same tolerance, 1 thread 2.32 (0.98x)
    | sklearn same tolerance, 2 threads 77.2 (one round; OpenBLAS threads spinning on a full machine)
    | sklearn defaults, 1 thread 0.56 (stops at 100 iterations / tol 1e-4; 99.1 % of queries as ours).
All tolerance-matched runs chose λ = 1e-5 and agree with ours on every query (81.3 %). Claim holds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see benchmarks/knn.py

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, machine_label  # noqa: E402

from fastmem.errors import FastmemError  # noqa: E402
from fastmem.probe.linear import (  # noqa: E402
    DEFAULT_GRID,
    MAX_ITER,
    TOLERANCE_GRAD,
    fit_linear_probe,
    heldout_split,
    normalize_rows,
    sklearn_C,
)

RESULTS = Path(__file__).resolve().parent / "results"
SLOW_SECONDS = 30.0  # a method slower than this in the first round is not repeated
Fit = Callable[[np.ndarray, np.ndarray, np.ndarray], dict]


def features(n: int, dim: int, synthetic: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """(n × dim float32 rows, labels, description)."""
    rng = np.random.default_rng(0)
    if not synthetic:
        try:
            from fastmem.data import load_arrays

            data = load_arrays("fashion-mnist", "train")
            rows = rng.choice(len(data), n, replace=False)
            pixels = data.images[rows].reshape(n, -1).astype(np.float32) / 255
            projection = rng.standard_normal((pixels.shape[1], dim)).astype(np.float32) / np.sqrt(pixels.shape[1])
            return pixels @ projection, data.labels[rows].astype(np.int64), "Fashion-MNIST pixels, random projection"
        except FastmemError as err:
            print(f"Fashion-MNIST not found ({err}); using Gaussian clusters")
    labels = rng.integers(0, 10, n)
    centres = rng.standard_normal((10, dim))
    return (centres[labels] + 3 * rng.standard_normal((n, dim))).astype(np.float32), labels, "Gaussian clusters"


def ours(threads: int) -> Fit:
    def fit(x: np.ndarray, y: np.ndarray, queries: np.ndarray) -> dict:
        probe = fit_linear_probe(x, y, 10, threads=threads)
        return {"l2": probe.l2, "heldout_accuracy": dict(zip(probe.l2_grid, probe.heldout_accuracy)),
                "predictions": probe.predict(queries), "refit_iterations": probe.iterations}
    return fit


def sklearn_protocol(tol: float, max_iter: int, threads: int) -> Fit:
    """Our protocol step by step with LogisticRegression as the solver (warm-started along the path), its
    BLAS and OpenMP pools limited to `threads`."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    def fit(x: np.ndarray, y: np.ndarray, queries: np.ndarray) -> dict:
        with threadpool_limits(threads):
            return steps(x, y, queries)

    def steps(x: np.ndarray, y: np.ndarray, queries: np.ndarray) -> dict:
        rows = normalize_rows(x).numpy()
        fit_rows, held_rows = heldout_split(y, 0)
        model = LogisticRegression(tol=tol, max_iter=max_iter, warm_start=True)
        scores, fitted = {}, {}
        for l2 in sorted(DEFAULT_GRID, reverse=True):
            model.set_params(C=sklearn_C(l2, len(fit_rows), 10)).fit(rows[fit_rows], y[fit_rows])
            proba = model.predict_proba(rows[held_rows])
            loss = -np.log(proba[np.arange(len(held_rows)), y[held_rows]]).mean()
            scores[l2] = ((proba.argmax(1) == y[held_rows]).mean(), -loss, l2)
            fitted[l2] = (model.coef_.copy(), model.intercept_.copy())
        chosen = max(DEFAULT_GRID, key=lambda v: scores[v])
        model.coef_, model.intercept_ = fitted[chosen]
        model.set_params(C=sklearn_C(chosen, len(y), 10)).fit(rows, y)
        return {"l2": chosen, "heldout_accuracy": {v: float(s[0]) for v, s in scores.items()},
                "predictions": model.predict(normalize_rows(queries).numpy()), "refit_iterations": int(model.n_iter_.max())}
    return fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best time is kept")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of the multi-thread rows")
    parser.add_argument("--synthetic", action="store_true", help="Gaussian clusters instead of Fashion-MNIST")
    parser.add_argument("--out", type=Path, default=RESULTS / "linear_probe-cpu.json")
    args = parser.parse_args()

    import sklearn

    rows, labels, source = features(args.train + args.queries, args.dim, args.synthetic)
    x, y, queries, truth = rows[: args.train], labels[: args.train], rows[args.train :], labels[args.train :]
    n = args.threads
    table: dict[str, Fit] = {
        "ours (torch L-BFGS, threads=1: the default)": ours(1),
        f"ours, threads={n}": ours(n),
        f"sklearn lbfgs, tol {TOLERANCE_GRAD:g} (as ours), 1 thread": sklearn_protocol(TOLERANCE_GRAD, MAX_ITER, 1),
        f"sklearn lbfgs, tol {TOLERANCE_GRAD:g} (as ours), {n} threads": sklearn_protocol(TOLERANCE_GRAD, MAX_ITER, n),
        "sklearn lbfgs, its defaults (tol 1e-4, 100 it), 1 thread": sklearn_protocol(1e-4, 100, 1),
    }
    if n == 1:
        del table[f"ours, threads={n}"], table[f"sklearn lbfgs, tol {TOLERANCE_GRAD:g} (as ours), {n} threads"]
    info = describe_machine(torch.device("cpu"))
    load = os.getloadavg()[0]
    print(f"machine: {machine_label(info)}, torch {info['torch']}, scikit-learn {sklearn.__version__},"
          f" OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average at start {load:.2f}")
    print(f"{args.train} x {args.dim} float32 fit rows ({source}), 10 classes, {args.queries} queries;"
          f" grid {list(DEFAULT_GRID)}, best of {args.repeats}")
    fit_linear_probe(x[:200], y[:200], 10, l2_grid=(1e-2,))  # load torch.optim's modules outside the timings
    best = dict.fromkeys(table, float("inf"))
    results: dict[str, dict] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning under its defaults: shown as a column
        for round_ in range(args.repeats):
            for name, fit in table.items():
                if round_ and best[name] > SLOW_SECONDS:
                    continue  # one round is enough to show a pathological row (and its rounds would take minutes)
                started = time.perf_counter()
                results[name] = fit(x, y, queries)
                best[name] = min(best[name], time.perf_counter() - started)
    first = next(iter(table))
    rows_out = []
    for name, seconds in best.items():
        result = results[name]
        rows_out.append({"method": name, "seconds": seconds, "speedup_of_ours": seconds / best[first], "l2": result["l2"],
                         "heldout_accuracy": {str(k): v for k, v in result["heldout_accuracy"].items()},
                         "query_accuracy": float((result["predictions"] == truth).mean()),
                         "agreement_with_ours": float((result["predictions"] == results[first]["predictions"]).mean()),
                         "refit_iterations": result["refit_iterations"]})
    print(f"\n{'method':58s} {'seconds':>8s} {'ours is':>8s} {'chosen λ':>9s} {'held-out':>9s} {'query acc':>9s}"
          f" {'= ours':>7s} {'refit it':>8s}")
    for row in rows_out:
        print(f"{row['method']:58s} {row['seconds']:8.2f} {row['speedup_of_ours']:7.2f}x {row['l2']:9.0e}"
              f" {row['heldout_accuracy'][str(row['l2'])]:9.4f} {row['query_accuracy']:9.4f}"
              f" {row['agreement_with_ours']:7.1%} {row['refit_iterations']:8d}")
    end_load = os.getloadavg()[0]
    verdict = "holds" if best[first] <= 10 else "does not hold"
    print(f"\nclaim (ours <= 10 s for the whole protocol): {verdict} ({best[first]:.2f} s); load average at end {end_load:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "threads": args.threads, "features": source, "train": args.train,
                                    "queries": args.queries, "dim": args.dim, "grid": list(DEFAULT_GRID),
                                    "load_average": [load, end_load], "rows": rows_out}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
