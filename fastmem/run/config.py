"""The trainer's configuration: one dataclass, and the argparse CLI generated from it.

Every knob has a default and a help line here; `python -m fastmem.train --help` shows them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmem.errors import fail
from fastmem.kernels.vote import DEFAULT_K, DEFAULT_TEMPERATURE, VOTES
from fastmem.pipelines import BACKENDS, PIPELINE_NAMES
from fastmem.runtime import COMPILE_MODES, EXTRACT_BACKENDS, PRECISIONS


def _knob(default: Any, help: str, *, execution: bool = False, resumable: bool = False, **extra: Any) -> Any:
    """A TrainConfig field. `execution`: how the run is executed, not what it computes (left out of its
    identity, free to change on resume); `resumable`: part of its identity but free to change on resume."""
    return field(default=default, metadata={"help": help, "execution": execution, "resumable": resumable or execution,
                                            **extra})


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as config.json in the run directory)."""

    # data
    dataset: str = _knob("fashion-mnist", "dataset: fashion-mnist, cifar10, cifar100, imagefolder, synthetic")
    data_dir: str | None = _knob(None, "where the dataset files are (else $FASTMEM_DATA, then system locations)")
    subset: int = _knob(0, "train on a seeded random subset of this many training images (0 = all)")
    probe_subset: int = _knob(0, "probe with this many test images as queries (0 = all)")
    probe_reference: int = _knob(0, "k-NN reference of the probe: this many training-split images of the data seed's "
                                    "order, which contains every smaller --subset (0 = the training images)")
    image_size: int = _knob(0, "decode/resize size for imagefolder and synthetic data (0 = 64 / 32)")
    data_seed: int = _knob(0, "seed of the data choices: the training subset, the probe queries and the i.i.d. view "
                              "pool (kept apart from --seed, so a seed sweep varies only labels, init and augmentation)")
    # labels
    label_noise: float = _knob(1.0, "fraction of training labels redrawn uniformly at random (1 = all random)")
    label_seed: int = _knob(0, "seed of the random labels")
    # pipeline
    pipeline: str = _knob("device", "loader backend: " + "; ".join(f"{name} ({entry.help})" for name, entry in BACKENDS.items()),
                          choices=PIPELINE_NAMES)
    augment: str = _knob("full", "augmentation: none, standard (crop+flip), full (paper's SimCLR set), "
                         "strength:A (RandAugment, 0 <= A <= 1), fullfixed:N[:same|random] (N fixed views per image)")
    batch_size: int = _knob(256, "batch size (the last partial batch is dropped)")
    workers: int = _knob(0, "DataLoader worker processes for the torch pipeline", execution=True)
    iid_views: int = _knob(0, "i.i.d. views M (experiment G): each load of image i shows one of M reserved real images "
                           "of its true class from the rest of the training split (disjoint across images), with i's "
                           "random label; -1 = any image of its true class outside --subset, drawn uniformly from "
                           "that class's whole pool, shared by the class's images (0 = off; device and torch pipelines)")
    mixup: float = _knob(0.0, "per-batch probability of Mixup x <- lam*x + (1-lam)*x[perm], lam ~ U(0,1); "
                         "labels not mixed")
    cutmix: float = _knob(0.0, "per-batch probability of CutMix (a box of area 1-lam pasted from x[perm]; labels "
                          "kept); mixup + cutmix <= 1")
    # model
    model: str = _knob("small_cnn", "model: small_cnn, conv4 (plain strided CNN), resnet18 (CIFAR stem), mlp")
    width: float = _knob(1.0, "width multiplier of the encoder")
    bottleneck_dim: int = _knob(4096, "projector width B (0 = a single linear head)")
    init_from: str = _knob("", "start from the weights of this run directory or checkpoint.pt (experiment J)")
    reinit: str = _knob("", "with --init-from: freshly re-initialize these parts, comma-separated: encoder blocks "
                        "(stem, stage1..stage4), head (the projector), head_hidden / head_out (its first / last linear)")
    # optimisation
    loss: str = _knob("mse", "mse on one-hot targets (paper) or ce (cross-entropy)", choices=("mse", "ce"))
    optimizer: str = _knob("adam", "optimizer", choices=("adam", "sgd"))
    lr: float = _knob(3e-4, "learning rate (constant)")
    momentum: float = _knob(0.9, "SGD momentum")
    weight_decay: float = _knob(0.0, "weight decay")
    epochs: int = _knob(10, "number of epochs", resumable=True)
    # execution
    device: str = _knob("auto", "auto, cpu or cuda[:N]", execution=True)
    precision: str = _knob("auto", "autocast: auto (bf16 where fast), bf16, fp16 (CUDA, grad scaler), fp32",
                           choices=PRECISIONS)
    channels_last: bool = _knob(True, "channels_last memory format for images and model")
    compile: bool = _knob(False, "torch.compile the model")
    compile_mode: str = _knob("default", "torch.compile mode under --compile: default, reduce-overhead (Inductor "
                              "captures CUDA graphs), max-autotune (autotuned kernels + CUDA graphs) or "
                              "max-autotune-no-cudagraphs", choices=COMPILE_MODES, execution=True)
    cuda_graph: bool = _knob(False, "CUDA only: capture forward + loss + backward + optimizer step once in a CUDA "
                             "graph (after a few eager warm-up steps on the first batches) and replay it every step. "
                             "Works with bf16 or fp32, mixup/cutmix (mixed before the batch is copied in), Adam "
                             "(made capturable) or SGD, and --compile with --compile-mode default or "
                             "max-autotune-no-cudagraphs; refused on CPU, with fp16 (its grad scaler syncs and skips "
                             "steps), under torchrun (DDP) and with the compile modes that capture graphs themselves. "
                             "Every batch must have the first one's shape (the loaders drop the last partial batch)",
                             execution=True)
    sync_bn: bool = _knob(False, "under torchrun: SyncBatchNorm (statistics over the global batch; CUDA only) instead "
                          "of each rank normalizing its own batch")
    threads: int = _knob(0, "torch CPU threads (0 = torch's default)", execution=True)
    seed: int = _knob(0, "seed of initialisation, data order and augmentation (not of the data choices: --data-seed)")
    # probe
    probe_every: int = _knob(0, "k-NN probe every E epochs, plus the untrained net and the end (0 = start and end only, -1 = never)")
    probe_k: int = _knob(DEFAULT_K, "k of the k-NN probe")
    probe_vote: str = _knob("majority", "k-NN vote: majority (paper) or weighted (DINO, exp(sim/T), T = "
                            "--probe-temperature)", choices=VOTES)
    probe_project_dim: int = _knob(0, "random-project probe points wider than this to this dim (0 = exact; e.g. 4096 for B = 65,536)")
    extract_backend: str = _knob("eager", "probe embedding extraction: eager (PyTorch) or trt (a torch-tensorrt engine "
                                 "built at each probe; falls back to eager without torch-tensorrt or a GPU)",
                                 choices=EXTRACT_BACKENDS, resumable=True)
    probe_temperature: float = _knob(DEFAULT_TEMPERATURE, "temperature T of the weighted k-NN vote exp(sim/T)")
    # output
    out: str = _knob("", "run directory (default runs/<dataset>-<model>-<augment>-noise<p>-seed<s>)", execution=True)
    checkpoint_every: int = _knob(10, "write a checkpoint every E epochs (and always at the end)", execution=True)
    tensorboard: bool = _knob(False, "also log metrics to TensorBoard in RUN_DIR/tb", execution=True)
    progress: bool = _knob(True, "show a progress bar", execution=True)
    max_steps_per_epoch: int = _knob(0, "cap the steps of each epoch (0 = no cap; for quick tests)")

    def run_name(self) -> str:
        return f"{self.dataset}-{self.model}-{self.augment}-noise{self.label_noise:g}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | Path = "config") -> TrainConfig:
        """A config from saved values (missing knobs take their defaults); bad keys or values fail naming `source`."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            fail(f"{source}: unknown keys {', '.join(unknown[:5])}{', …' if len(unknown) > 5 else ''}; not a run config")
        checked = {name: _checked_value(known[name], value, source) for name, value in values.items()}
        return cls(**checked)


def _checked_value(f: dataclasses.Field[Any], value: Any, source: str | Path) -> Any:
    """A saved knob's value, checked against the field's type and choices (an int is a valid float)."""
    kind = str(f.type)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"int": number and isinstance(value, int), "float": number, "bool": isinstance(value, bool),
          "str": isinstance(value, str), "str | None": value is None or isinstance(value, str)}.get(kind, True)
    if not ok:
        fail(f"{source}: {f.name} is {_short(value)}, not a{'n' if kind == 'int' else ''} {kind}; not a valid run config")
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        fail(f"{source}: {f.name} is {_short(value)}, not one of {', '.join(f.metadata['choices'])}")
    return float(value) if kind == "float" else value


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _saved_values(run_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """The parsed config.json of a run directory; a missing, torn, garbage or foreign one is a user error naming it."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        fail(f"{run_dir}: not a run directory (no config.json)")
    try:
        text = config_path.read_bytes().decode("utf-8")
    except OSError as err:
        fail(f"{config_path}: cannot read the run config ({err.strerror or err})")
    except UnicodeDecodeError:
        fail(f"{config_path}: not UTF-8 text; not a run config")
    if not text.strip():
        fail(f"{config_path}: empty file; not a run config")
    try:
        values = json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, digit limit, deep nesting
        fail(f"{config_path}: not valid JSON ({' '.join(str(err).split())[:120] or type(err).__name__}); truncated or garbage")
    if not isinstance(values, dict):
        fail(f"{config_path}: a JSON {type(values).__name__}, not an object; not a run config")
    return values, config_path


# config.json's one key that is not a knob: what the run resolved its `auto` choices to (e.g. precision).
RESOLVED_KEY = "resolved"


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The config.json of a run directory; a missing, torn, garbage or foreign one is a user error naming it."""
    values, config_path = _saved_values(run_dir)
    values.pop(RESOLVED_KEY, None)
    return TrainConfig.from_dict(values, config_path)


def load_resolved(run_dir: str | Path) -> dict[str, Any]:
    """What a saved run resolved its `auto` choices to (empty for runs saved before it was recorded)."""
    resolved = _saved_values(run_dir)[0].get(RESOLVED_KEY)
    return resolved if isinstance(resolved, dict) else {}




# From the fields' metadata (one source): knobs left out of a run's identity, and knobs a resume may change.
EXECUTION_KNOBS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["execution"])
RESUMABLE_KNOBS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resumable"])


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def knob_type(name: str) -> Any:
    """The parser of a TrainConfig field's command-line text (int, float, true/false or str)."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    return {"int": int, "float": float, "bool": _bool}.get(kinds[name], str)


def build_parser(prog: str = "python -m fastmem.train") -> argparse.ArgumentParser:
    """An argparse parser with one --flag per TrainConfig field, plus --resume."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Train on random labels under augmentation and probe every layer with k-NN.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = knob_type(f.name)
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        metavar = "BOOL" if kind is _bool else None
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f.metadata["help"], metavar=metavar, **extra)
    parser.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue the run saved in RUN_DIR")
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[TrainConfig, set[str], str | None]:
    """Parse the command line into (config, names of explicitly given knobs, resume dir)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # A second pass with every default suppressed tells which knobs the user actually gave.
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(probe.parse_args(argv))) - {"resume"}
    values = {k: v for k, v in vars(args).items() if k != "resume"}
    return TrainConfig(**values), explicit, args.resume
