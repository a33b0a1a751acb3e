"""The probe CLI's metric paths: `RUN_DIR --metrics knn,linear,memorization` (or several --k), and any model
(`--model torchvision:resnet18 --weights none --dataset fashion-mnist --layers layer2,layer4`).

Both print a per-layer table, one column per metric column (`knn@20`, `linear`, `memo-knn@20`, `memo-linear`),
each value with its 95 % Wilson interval. A run writes RUN_DIR/probe-epoch<E>-<metrics>-k<k…>-<vote>.{json,csv}
and the per-row predictions beside them (.npz, `<layer>/<column>` and `<layer>/<column>/truth`: for paired
intervals); `--model` writes them to `--out STEM` when given. `python -m fastmem.probe RUN_DIR` with k-NN
alone at one k keeps its own table and files (__main__.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmem.data import DATASET_NAMES, ArrayDataset
from fastmem.data.labels import load_labels
from fastmem.data.splits import load_run_splits, select_run_data
from fastmem.distributed import rank_info
from fastmem.errors import fail
from fastmem.io_utils import atomic_path, write_json_atomic
from fastmem.run.checkpoint import CHECKPOINT_NAME
from fastmem.run.config import TrainConfig
from fastmem.runtime import resolve_device

from .any_model import IMAGENET_MEAN, IMAGENET_STD, as_probe_model
from .cache import EmbeddingCache
from .library import ProbeReport, embed_inputs, evaluate_embeddings, probe_model
from .metrics import METRICS, MetricOptions, needed, resolve_metrics
from .metrics.knn import check_ks
from .run_model import load_run_model
from .trt_extract import TRT_ENGINE_DIR

# flags that only mean something with --model, and with a RUN_DIR
MODEL_ONLY = ("weights", "dataset", "data_dir", "subset", "data_seed", "image_size", "seed", "input_norm", "resize", "out")
RUN_ONLY = ("checkpoint", "untrained", "extract_backend")
INPUT_NORMS = ("auto", "imagenet", "none")


def k_values(text: str) -> int | tuple[int, ...]:
    """--k: one k (an int, as before) or a comma list of distinct k (a tuple)."""
    try:
        values = tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected k or a comma list such as 10,20,50, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"every k must be a positive integer, got {text!r}")
    return values[0] if len(values) == 1 else values


def as_ks(k: int | tuple[int, ...]) -> tuple[int, ...]:
    return check_ks((k,) if isinstance(k, int) else tuple(k))


def only_knn(metrics: str | None) -> bool:
    """Whether --metrics asks for the k-NN metric alone (the default)."""
    return metrics is None or [name.strip() for name in metrics.split(",") if name.strip()] == ["knn"]


def add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the metrics and of --model mode."""
    parser.add_argument("--metrics", default=None,
                        help=f"comma list of registered metrics ({', '.join(METRICS)}); default knn. memorization "
                             "scores the training images against the run's own (random) labels, RUN_DIR/labels.npz")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (unset: torch's own count)")
    parser.add_argument("--linear-seed", type=int, default=0, help="seed of the linear probe's held-out split")
    parser.add_argument("--memorization-l2", type=float, default=MetricOptions.memorization_l2,
                        help="λ of memorization's linear fit to the random labels")
    model = parser.add_argument_group("any model (instead of RUN_DIR)")
    model.add_argument("--model", default=None, help="torchvision:NAME or timm:NAME (e.g. torchvision:resnet18)")
    model.add_argument("--weights", default="none", help="none (seeded random init), a state-dict file "
                       "(torch.load weights_only), or a pretrained name such as DEFAULT")
    model.add_argument("--dataset", default=None, help=f"one of {', '.join(DATASET_NAMES)}")
    model.add_argument("--data-dir", default=None, help="where the dataset lives (unset: its standard place)")
    model.add_argument("--subset", type=int, default=0, help="training images as the reference, a seeded subset (0 = all)")
    model.add_argument("--data-seed", type=int, default=0, help="seed of --subset and --probe-subset")
    model.add_argument("--image-size", type=int, default=0, help="image size for imagefolder/synthetic data (0 = native)")
    model.add_argument("--seed", type=int, default=0, help="torch seed of a randomly initialised model")
    model.add_argument("--input-norm", default="auto", choices=INPUT_NORMS,
                       help="per-channel input normalisation: the model's own (ImageNet for torchvision), or as named")
    model.add_argument("--resize", type=int, default=0, help="resize images to this square size inside the model (0 = as they are)")
    model.add_argument("--out", default=None, help="write the report to OUT.json, OUT.csv and OUT.npz (predictions)")


def check_mode(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A RUN_DIR or --model, each with its own flags; one line otherwise."""
    if args.run_dir is not None and args.model is not None:
        fail("give a RUN_DIR or --model, not both")
    if args.run_dir is None and args.model is None:
        fail("give a RUN_DIR, or --model torchvision:NAME --dataset NAME --layers A,B")
    wrong = RUN_ONLY if args.model is not None else MODEL_ONLY
    changed = ["--" + dest.replace("_", "-") for dest in wrong if getattr(args, dest) != parser.get_default(dest)]
    if changed:
        fail(f"{', '.join(changed)} {'apply' if len(changed) > 1 else 'applies'} to "
             f"{'a RUN_DIR' if args.model is not None else '--model'} only")
    if args.threads is not None:
        if args.threads < 1:
            fail(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)


def run_targets(run_dir: Path, train: ArrayDataset) -> np.ndarray:
    """The labels the run trained on (RUN_DIR/labels.npz `targets`), checked against its training images."""
    path = run_dir / "labels.npz"
    if not path.exists():
        fail(f"memorization needs the run's training labels and {path} is missing")
    labels = load_labels(path)
    if labels.targets.shape[0] != len(train) or not np.array_equal(labels.true_labels, train.labels):
        fail(f"{path}: its labels do not belong to the run's {len(train)} training images (data changed?)")
    return labels.targets


def probe_run_metrics(args: argparse.Namespace, run_dir: Path, cfg: TrainConfig, cache_dir: Path | None,
                      device: torch.device, dtype: torch.dtype | None) -> int:
    """`python -m fastmem.probe RUN_DIR --metrics ...`: the run's network, data and labels through the metrics."""
    metrics = resolve_metrics(args.metrics or "knn")
    needs, ks = needed(metrics), as_ks(args.k)
    splits = load_run_splits(cfg.dataset, cfg.data_dir, subset=cfg.subset,
                             probe_subset=cfg.probe_subset if args.probe_subset is None else args.probe_subset,
                             image_size=cfg.image_size, seed=cfg.data_seed, probe_reference=cfg.probe_reference)
    reference, test, train = splits.reference, splits.test, splits.train
    targets = run_targets(run_dir, train) if "train_targets" in needs else None
    model, epoch, layers = load_run_model(run_dir, cfg, reference, device, checkpoint=args.checkpoint,
                                          untrained=args.untrained, layers=args.layers)
    distributed = rank_info().world > 1
    options = MetricOptions(k=ks, vote=args.vote, temperature=args.temperature, device=device,
                            knn_backend=args.knn_backend, distributed=distributed, linear_seed=args.linear_seed,
                            memorization_l2=args.memorization_l2, threads=args.threads or 1)
    started = time.perf_counter()
    embedded = embed_inputs(
        model, layers, needs, reference=(reference.images, reference.labels), queries=(test.images, test.labels),
        train=None if reference is train else (train.images, train.labels), device=device, dtype=dtype,
        cache=None if cache_dir is None else EmbeddingCache(cache_dir), project_dim=args.project_dim,
        batch_size=args.extract_batch_size, distributed=distributed, extract_backend=args.extract_backend,
        engine_dir=Path(args.checkpoint or run_dir / CHECKPOINT_NAME).parent / TRT_ENGINE_DIR)
    values = evaluate_embeddings(metrics, layers, embedded, num_classes=reference.num_classes, options=options,
                                 reference_labels=reference.labels, query_labels=test.labels, train_targets=targets)
    report = ProbeReport(values, tuple(c for m in metrics for c in m.columns(options)), references=len(reference),
                         queries=len(test), train=None if targets is None else len(train),
                         seconds=time.perf_counter() - started,
                         settings={"k": list(ks), "vote": args.vote, "metrics": [m.name for m in metrics]})
    print(f"probe of {run_dir} at epoch {epoch}: {describe(report, args.vote)}")
    print(report.table())
    if rank_info().is_main:
        stem = run_dir / f"probe-epoch{epoch}-{'+'.join(m.name for m in metrics)}-k{'-'.join(map(str, ks))}-{args.vote}"
        write_report(stem, report, {"run_dir": str(run_dir), "epoch": epoch})
    return 0


def describe(report: ProbeReport, vote: str) -> str:
    """The header line after 'probe of X': metrics, k, vote, set sizes, time."""
    parts = [", ".join(report.settings["metrics"]), f"k={','.join(map(str, report.settings['k']))}", f"{vote} vote",
             f"{report.references} references (true labels)"]
    if report.queries is not None:
        parts.append(f"{report.queries} test queries")
    if report.train is not None:
        parts.append(f"{report.train} training images (against their training labels)")
    return "; ".join(parts) + f"; {report.seconds:.1f} s"


def write_report(stem: Path, report: ProbeReport, extra: dict[str, Any]) -> None:
    """STEM.json (values, intervals, settings), STEM.csv (one row per layer and column), STEM.npz (predictions)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stem.with_suffix(".json"), {**extra, **report.to_dict()}, sort_keys=False)
    with atomic_path(stem.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as handle:
        csv.writer(handle).writerows(report.csv_rows())
    arrays = {}
    for layer, columns in report.values.items():
        for column, value in columns.items():
            if value.predictions is not None and value.truth is not None:
                arrays[f"{layer}/{column}"], arrays[f"{layer}/{column}/truth"] = value.predictions, value.truth
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(stem.with_suffix(".npz")) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.csv')} and {stem.with_suffix('.npz')}")


def probe_any_model(args: argparse.Namespace) -> int:
    """`python -m fastmem.probe --model SPEC --dataset NAME --layers A,B`: any model on any dataset."""
    if not args.dataset:
        fail(f"--model needs --dataset ({', '.join(DATASET_NAMES)})")
    metrics = resolve_metrics(args.metrics or "knn")
    if "train_targets" in needed(metrics):
        fail("memorization needs the labels a network trained on: probe its RUN_DIR (labels.npz), or call "
             "fastmem.probe.probe_model(..., train_targets=...)")
    if args.extract_batch_size < 1:
        fail(f"--extract-batch-size must be positive, got {args.extract_batch_size}")
    device = resolve_device(args.device)
    mean, std = {"auto": (None, None), "imagenet": (IMAGENET_MEAN, IMAGENET_STD), "none": ((), ())}[args.input_norm]
    torch.manual_seed(args.seed)  # a randomly initialised model is the seed's
    model, layers = as_probe_model(args.model, args.layers, weights=args.weights, mean=mean, std=std,
                                   resize=args.resize)  # before the data: a bad model or layer fails fast
    reference, test = select_run_data(args.dataset, args.data_dir, subset=args.subset, probe_subset=args.probe_subset or 0,
                                      image_size=args.image_size, seed=args.data_seed)
    cache = EmbeddingCache(args.cache_dir) if args.cache_dir and not args.no_cache else None
    report = probe_model(model, layers, reference.images, reference.labels, test.images, test.labels,
                         metrics=[m.name for m in metrics], k=as_ks(args.k), vote=args.vote, temperature=args.temperature,
                         num_classes=reference.num_classes, device=device, precision=args.precision,
                         batch_size=args.extract_batch_size, cache=cache, project_dim=args.project_dim,
                         knn_backend=args.knn_backend, linear_seed=args.linear_seed,
                         memorization_l2=args.memorization_l2, threads=args.threads or 1)
    print(f"probe of {args.model} (weights {args.weights}) on {args.dataset}: {describe(report, args.vote)}")
    print(report.table())
    if args.out:
        write_report(Path(args.out), report, {"model": args.model, "weights": args.weights, "dataset": args.dataset,
                                              "layers": list(report.layers)})
    return 0
