"""`python -m fastmem.probe RUN_DIR`: per-layer k-NN accuracy of a run's checkpoint, as a table, JSON and CSV."""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastmem.data.splits import select_run_data
from fastmem.distributed import distributed_session, rank_device, rank_info
from fastmem.errors import fail, run_cli
from fastmem.io_utils import atomic_path, write_json_atomic
from fastmem.kernels import BACKENDS, DEFAULT_K, DEFAULT_TEMPERATURE, VOTES
from fastmem.run.checkpoint import CHECKPOINT_NAME
from fastmem.run.config import TrainConfig, load_resolved, load_run_config
from fastmem.run.lock import hold_run_lock, remove_stale_temps
from fastmem.run.stats import wilson_interval
from fastmem.runtime import EXTRACT_BACKENDS, PRECISIONS, resolve_device, resolve_precision

from . import TRT_ENGINE_DIR, EmbeddingCache, EmbeddingCacheWarning, probe_knn
from .cli_metrics import add_metric_arguments, check_mode, k_values, only_knn, probe_any_model, probe_run_metrics
from .run_model import load_run_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastmem.probe", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Per-layer probes of a trained run (RUN_DIR: k-NN accuracy against the true labels at every probe "
                    "point, by default), or of any model on any dataset (--model torchvision:NAME --dataset NAME "
                    "--layers A,B): k-NN, linear and memorization metrics with 95 % Wilson intervals.",
    )
    parser.add_argument("run_dir", nargs="?", default=None, help="a run directory of python -m fastmem.train "
                        "(or none, with --model)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint to probe (default RUN_DIR/checkpoint.pt)")
    parser.add_argument("--untrained", action="store_true", help="probe the untrained network of the run (its seed's initialisation)")
    parser.add_argument("--layers", default="", help="comma-separated probe points (default: all of a run's; "
                        "with --model: graph nodes or module names, required)")
    parser.add_argument("--k", type=k_values, default=DEFAULT_K,
                        help="neighbours; several as 10,20,50 (one neighbour search per layer serves them all)")
    parser.add_argument("--vote", default="majority", choices=VOTES,
                        help="majority (paper) or weighted (DINO, exp(sim/T))")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="T of the weighted vote")
    parser.add_argument("--probe-subset", type=int, default=None, help="test images as queries (default: the run's; "
                        "with --model: all)")
    parser.add_argument("--project-dim", type=int, default=0, help="random-project wider layers to this dim (0 = exact)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="autocast for extraction (default: what the run trained in, from its config.json; "
                             "auto where it records none or ran on another device; with --model: fp32 on a CPU, "
                             "auto on CUDA)")
    parser.add_argument("--knn-backend", default="auto", choices=BACKENDS, help="k-NN kernels")
    parser.add_argument("--extract-backend", default="eager", choices=EXTRACT_BACKENDS,
                        help="embedding extraction: eager, or trt (a torch-tensorrt engine cached beside the checkpoint; "
                             "eager without torch-tensorrt or a GPU)")
    parser.add_argument("--extract-batch-size", type=int, default=1024, help="images per extraction batch")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default RUN_DIR/embeddings; "
                        "with --model: none)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    add_metric_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_mode(args, build_parser())
    with warnings.catch_warnings():
        warnings.showwarning = one_line_cache_warnings(warnings.showwarning)
        if args.model is not None:
            return probe_any_model(args)
        with distributed_session():  # under torchrun: extraction and queries split across ranks, rank 0 writes
            return probe_run(args)


def one_line_cache_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """A showwarning that prints the cache's warnings as one line, `fastmem: warning: ...` (others as before)."""
    def showwarning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if issubclass(category, EmbeddingCacheWarning):
            print(f"fastmem: warning: {message}", file=file or sys.stderr, flush=True)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


LOCK_HINT = "wait for it to finish"


def probe_run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir)
    cache_dir = None if args.no_cache else Path(args.cache_dir or run_dir / "embeddings")
    with contextlib.ExitStack() as locks:
        if rank_info().is_main:  # one process per run directory (and cache); under torchrun rank 0 holds it
            for directory in _lock_domains(run_dir, cache_dir):
                locks.enter_context(hold_run_lock(directory, hint=LOCK_HINT))
                remove_stale_temps(directory)
        return _probe(args, run_dir, cfg, cache_dir)


def run_precision(run_dir: Path, device: torch.device, asked: str | None) -> str | None:
    """The precision the run recorded (config.json's `resolved`) when none is asked and the device is the same."""
    recorded = load_resolved(run_dir)
    if asked is None and recorded.get("device") == device.type and recorded.get("precision") in ("bf16", "fp32"):
        return str(recorded["precision"])
    return None


def _lock_domains(run_dir: Path, cache_dir: Path | None) -> list[Path]:
    """The run directory, and the cache directory too when it lies outside it."""
    if cache_dir is None or cache_dir.resolve().is_relative_to(run_dir.resolve()):
        return [run_dir]
    return [run_dir, cache_dir]


def _probe(args: argparse.Namespace, run_dir: Path, cfg: TrainConfig, cache_dir: Path | None) -> int:
    device = rank_device(resolve_device(args.device))
    dtype = resolve_precision(args.precision or "auto", device, run_precision(run_dir, device, args.precision))
    if args.extract_batch_size < 1:
        fail(f"--extract-batch-size must be positive, got {args.extract_batch_size}")
    if not only_knn(args.metrics) or not isinstance(args.k, int):  # other metrics, or several k: the metrics table
        return probe_run_metrics(args, run_dir, cfg, cache_dir, device, dtype)
    train, test = select_run_data(cfg.dataset, cfg.data_dir, subset=cfg.subset,
                                  probe_subset=cfg.probe_subset if args.probe_subset is None else args.probe_subset,
                                  image_size=cfg.image_size, seed=cfg.data_seed, probe_reference=cfg.probe_reference)
    model, epoch, layers = load_run_model(run_dir, cfg, train, device, checkpoint=args.checkpoint,
                                          untrained=args.untrained, layers=args.layers)
    cache = None if cache_dir is None else EmbeddingCache(cache_dir)
    started = time.perf_counter()
    accuracy = probe_knn(model, train.images, train.labels, test.images, test.labels, device=device, dtype=dtype,
                         k=args.k, vote=args.vote, temperature=args.temperature, num_classes=train.num_classes,
                         layers=layers, cache=cache, project_dim=args.project_dim, knn_backend=args.knn_backend,
                         extract_batch_size=args.extract_batch_size, distributed=rank_info().world > 1,
                         extract_backend=args.extract_backend,
                         engine_dir=Path(args.checkpoint or run_dir / CHECKPOINT_NAME).parent / TRT_ENGINE_DIR)
    seconds = time.perf_counter() - started
    print(f"k-NN probe of {run_dir} at epoch {epoch}: k={args.k}, {args.vote} vote, {len(train)} references "
          f"(true labels), {len(test)} test queries, {seconds:.1f} s")
    intervals = {layer: wilson_interval(int(round(value * len(test))), len(test)) for layer, value in accuracy.items()}
    print(f"{'probe point':<14} {'k-NN accuracy':>14}  95 % interval (Wilson, over the queries)")
    for layer, value in accuracy.items():
        low, high = intervals[layer].low, intervals[layer].high
        print(f"{layer:<14} {100 * value:>13.2f}%  [{100 * low:.2f}, {100 * high:.2f}]")
    if not rank_info().is_main:
        return 0
    stem = run_dir / f"probe-epoch{epoch}-k{args.k}-{args.vote}"
    result = {"run_dir": str(run_dir), "epoch": epoch, "k": args.k, "vote": args.vote, "references": len(train),
              "queries": len(test), "accuracy": accuracy,
              "interval_95": {layer: [i.low, i.high] for layer, i in intervals.items()}, "seconds": seconds}
    write_json_atomic(stem.with_suffix(".json"), result, sort_keys=False)  # layers in probe order
    with atomic_path(stem.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "knn_accuracy", "low_95", "high_95"])
        writer.writerows((layer, value, intervals[layer].low, intervals[layer].high) for layer, value in accuracy.items())
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    run_cli(main)
