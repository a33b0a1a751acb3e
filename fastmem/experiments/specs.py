"""Experiments A–K of shared/PROTOCOL.md as small declarative specs.

An experiment is a list of variants (each a set of trainer knobs on top of its scale's base knobs)
plus what the report should draw. Three scales: `smoke` (seconds, for tests), `cpu` (Fashion-MNIST on
two cores, about an hour or less per experiment) and `paper` (the authors' settings, for GPUs).
Every experiment also carries the clean-label run of its scale as the report's reference line (the
main job, MAIN_JOB, does not); identical knob sets share one run directory across experiments, so it
is trained once. The main job (`make demo`, fastmem/experiments/demo.py) is a spec like the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SCALES = ("smoke", "cpu", "paper")

# What `experiments show` says of a scale before its runs.
SCALE_NOTES: dict[str, str] = {
    "paper": "scale paper: 1,000 epochs per run, a tenth of the paper's 10,000 (add --set epochs=10000 for all of "
             "them); fp32 and an exact probe of every layer, as the paper (--set precision=bf16 to opt into autocast)",
}

# Knobs every run of a scale starts from (TrainConfig field names).
SCALE_BASE: dict[str, dict[str, Any]] = {
    "smoke": {
        "dataset": "fashion-mnist", "subset": 256, "probe_subset": 200, "model": "small_cnn", "width": 0.25,
        "bottleneck_dim": 256, "batch_size": 64, "epochs": 3, "probe_every": 1, "checkpoint_every": 1,
        "loss": "mse", "optimizer": "adam", "lr": 3e-4, "device": "cpu", "precision": "fp32", "threads": 1,
        "progress": False,
    },
    # The recipe PROTOCOL.md reports as showing A on two cores (MSE, wide bias-free head, Adam 3e-4, batch 256) on
    # conv4, the plain strided CNN, with the subset, width and epochs measured to give the largest benign lift per
    # CPU minute (results/main-job/README.md); every test image is a query. `auto` precision: bf16 on CPUs that
    # run it natively and measurably faster, else fp32 (fastmem/runtime.py).
    "cpu": {
        "dataset": "fashion-mnist", "subset": 2000, "probe_subset": 0, "model": "conv4", "width": 0.5,
        "bottleneck_dim": 4096, "batch_size": 256, "epochs": 500, "probe_every": 50, "checkpoint_every": 50,
        "loss": "mse", "optimizer": "adam", "lr": 3e-4, "device": "cpu", "precision": "auto", "threads": 1,
        "progress": False,
    },
    # The authors' setup: fp32 and an exact probe of every layer (head_hidden too) by default, as the paper;
    # bf16 autocast is opt-in (--set precision=bf16, or auto). 1,000 epochs are a tenth of the paper's 10,000
    # (--set epochs=10000 for all of them).
    "paper": {
        "dataset": "cifar10", "subset": 0, "probe_subset": 0, "model": "resnet18", "width": 1.0,
        "bottleneck_dim": 65536, "batch_size": 256, "epochs": 1000, "probe_every": 50, "checkpoint_every": 50,
        "loss": "mse", "optimizer": "adam", "lr": 3e-4, "device": "cuda", "precision": "fp32",
        "probe_project_dim": 0, "progress": False,
    },
}


@dataclass(frozen=True)
class Variant:
    """One run of an experiment: its knobs (on top of the scale's base) and how the report shows it."""

    label: str
    knobs: Mapping[str, Any]
    value: float | None = None  # x position in the experiment's own plots (n, strength, p, …)
    group: str = ""  # a plot panel for experiments with several axes (F)
    role: str = "run"  # "run", "clean" (clean-label reference line) or "source" (J's trained network)
    init_from: str | None = None  # label of the variant whose final checkpoint this run starts from


@dataclass(frozen=True)
class Experiment:
    id: str
    title: str
    varies: str
    expectation: str
    build: Callable[[str], list[Variant]]
    x_label: str = ""
    plots: tuple[str, ...] = ()  # extra report plots: "tradeoff", "fit_vs_views", "capacity"
    notes: Mapping[str, str] = field(default_factory=dict)  # per scale: what it can and cannot show
    knobs: Mapping[str, Any] = field(default_factory=dict)  # on top of the scale base, under every variant's own
    clean_reference: bool = True  # add the scale's clean-label run when no variant is one

    def variants(self, scale: str) -> list[Variant]:
        """The experiment's runs at `scale`, the clean-label reference included."""
        variants = self.build(scale)
        if self.clean_reference and not any(v.role == "clean" for v in variants):
            variants.append(CLEAN)
        return variants


RANDOM = {"label_noise": 1.0}
CLEAN = Variant("clean labels, full aug", {"label_noise": 0.0, "augment": "full"}, role="clean")


def _pick(scale: str, smoke: list[Any], cpu: list[Any], paper: list[Any]) -> list[Any]:
    return {"smoke": smoke, "cpu": cpu, "paper": paper}[scale]


def _a(scale: str) -> list[Variant]:
    return [
        Variant("random labels, full aug", {**RANDOM, "augment": "full"}),
        Variant("random labels, no aug", {**RANDOM, "augment": "none"}),
        CLEAN,
    ]


def _b(scale: str) -> list[Variant]:
    return [
        Variant("random labels, no aug", {**RANDOM, "augment": "none"}, value=0),
        Variant("random labels, standard aug", {**RANDOM, "augment": "standard"}, value=1),
        Variant("random labels, full aug", {**RANDOM, "augment": "full"}, value=2),
        CLEAN,
    ]


def _c(scale: str) -> list[Variant]:
    ns = _pick(scale, [1, 4], [1, 2, 5, 20], [1, 2, 5, 10, 20, 50, 100])
    fixed = [Variant(f"n={n} views", {**RANDOM, "augment": f"fullfixed:{n}:same"}, value=n) for n in ns]
    return fixed + [Variant("n=∞ (full aug)", {**RANDOM, "augment": "full"}, value=float("inf"))]


def _d(scale: str) -> list[Variant]:
    strengths = _pick(scale, [0.5], [0.25, 0.5, 1.0], [0.1, 0.25, 0.5, 0.75, 1.0])
    named = [Variant("no aug", {**RANDOM, "augment": "none"}, value=0.0),
             Variant("standard aug", {**RANDOM, "augment": "standard"}, group="named sets"),
             Variant("full aug", {**RANDOM, "augment": "full"}, group="named sets")]
    return named + [Variant(f"RandAugment a={a:g}", {**RANDOM, "augment": f"strength:{a:g}"}, value=a) for a in strengths]


def _e(scale: str) -> list[Variant]:
    ns = _pick(scale, [1, 4], [1, 2, 5, 10, 20], [1, 2, 5, 10, 20, 50, 100])
    per_view = [Variant(f"n={n}, label per view", {**RANDOM, "augment": f"fullfixed:{n}:random"}, value=n) for n in ns]
    # The control (PROTOCOL E): C's one label per image at the same n, images, seed and steps (C's very runs).
    controls = _pick(scale, [4], [10, 20], [20, 100])
    return per_view + [Variant(f"n={n}, label per image (C)", {**RANDOM, "augment": f"fullfixed:{n}:same"}, value=n,
                               group="control: label per image") for n in controls]


def _f(scale: str) -> list[Variant]:
    base = SCALE_BASE[scale]
    aug = {**RANDOM, "augment": "full"}
    axes = [  # (panel, knob, values, label); each panel also shows the base run (the same run directory)
        ("projector width B", "bottleneck_dim", _pick(scale, [0, 1024], [0, 512, 16384], [0, 512, 4096, 16384]), "B={}"),
        ("training images N", "subset", _pick(scale, [128], [500, 8000], [1000, 5000, 20000]), "N={}"),
        ("encoder width", "width", _pick(scale, [0.5], [0.25, 1.0], [0.25, 0.5]), "width×{:g}"),
    ]
    # One k-NN reference and one query set for every variant: the first R training images of the data seed's
    # order (R = the largest N, so every subset lies inside it), and the data seed's queries.
    subsets = [(base["subset"] or 50000)] + axes[1][2]
    aug = {**aug, "probe_reference": max(subsets)}
    variants = []
    for group, knob, values, label in axes:
        base_value = (base[knob] or 50000) if knob == "subset" else base[knob]  # subset 0 = all of CIFAR's 50k
        variants.append(Variant(label.format(base_value), aug, value=base_value, group=group))
        variants += [Variant(label.format(v), {**aug, knob: v}, value=v, group=group) for v in values]
    # The data-size axis at equal optimizer steps (PROTOCOL F): the base run's steps, whatever N (last batch dropped).
    base_n = base["subset"] or 50000
    steps = (base_n // base["batch_size"]) * base["epochs"]
    for n in axes[1][2]:
        epochs = max(1, round(steps / max(1, n // base["batch_size"])))
        variants.append(Variant(f"N={n}, equal steps", {**aug, "subset": n, "epochs": epochs,
                                                        "probe_every": max(base["probe_every"], epochs // 10)},
                                value=n, group="training images N at equal steps"))
    return variants + [dataclasses.replace(CLEAN, knobs={**CLEAN.knobs, "probe_reference": aug["probe_reference"]})]


def _g(scale: str) -> list[Variant]:
    # m large enough that the images cannot be memorized one by one (Fashion-MNIST allows m = 25 disjoint pools at
    # N = 2,000), and every load drawn from all of the class's images outside the subset (m = all, shared pools).
    ms = _pick(scale, [2], [10, 25], [1, 2, 5, 10])
    same_image = Variant("the image itself (no aug)", {**RANDOM, "augment": "none"}, value=0)
    disjoint = [Variant(f"m={m} same-class images", {**RANDOM, "augment": "none", "iid_views": m}, value=m)
                for m in ms]
    shared = Variant("m=all (shared class pool)", {**RANDOM, "augment": "none", "iid_views": -1}, value=float("inf"))
    return [same_image, *disjoint, shared]


def _h(scale: str) -> list[Variant]:
    ps = _pick(scale, [0.0, 0.5, 1.0], [0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    variants = [Variant(f"noise p={p:g}", {"label_noise": p, "augment": "full"}, value=p) for p in ps]
    if 0.0 in ps:
        variants[ps.index(0.0)] = Variant("noise p=0", {"label_noise": 0.0, "augment": "full"}, value=0.0, role="clean")
    return variants


def _i(scale: str) -> list[Variant]:
    none = {**RANDOM, "augment": "none"}
    return [Variant("no aug", none), Variant("mixup p=0.8, no aug", {**none, "mixup": 0.8}),
            Variant("cutmix p=0.8, no aug", {**none, "cutmix": 0.8})]


def _j(scale: str) -> list[Variant]:
    source = "random labels, full aug (source)"
    retrain = {**RANDOM, "augment": "none", "label_seed": 1,
               "epochs": max(1, SCALE_BASE[scale]["epochs"] // 2)}
    resets = _pick(scale, ["head", "stage4,head"], ["head", "stage4,head", "stage3,stage4,head"],
                   ["head", "stage4,head", "stage3,stage4,head", "stage2,stage3,stage4,head"])
    variants = [Variant(source, {**RANDOM, "augment": "full"}, role="source"),
                Variant("from scratch, no aug", retrain, value=-1)]
    variants += [Variant(f"reset {r}", {**retrain, "reinit": r}, value=len(r.split(",")), init_from=source) for r in resets]
    return variants


def _k(scale: str) -> list[Variant]:
    return [CLEAN, Variant("clean labels, no aug", {"label_noise": 0.0, "augment": "none"})]


def _main(scale: str) -> list[Variant]:
    return [Variant("full augmentation", {**RANDOM, "augment": "full"}),
            Variant("no augmentation", {**RANDOM, "augment": "none"})]


# The main job (`make demo`): A's two random-label runs at the scale's probe cadence, seed tying labels and init.
MAIN_JOB = Experiment(
    "MAIN", "main job: benign vs malign memorization", "augment ∈ {full, none}, label_noise 1",
    "with augmentation the k-NN of h and the middle stages rises above the untrained network; without it the labels "
    "are fit and the late layers' k-NN collapses", _main,
    knobs={"seed": 0, "label_seed": 0}, clean_reference=False,
    notes={"cpu": "The runs of `make demo` (python -m fastmem.demo); its defaults are this scale's."},
)

EXPERIMENTS: dict[str, Experiment] = {e.id: e for e in [
    Experiment("A", "random labels ± augmentation", "augment ∈ {full, none}, label_noise 1",
               "with augmentation k-NN stays far above the untrained probe; without it the late layers collapse", _a,
               notes={"cpu": "Verdicts are computed from the runs (fastmem/experiments/claims.py); 3 seeds."}),
    Experiment("B", "layer-wise probe", "augment ∈ {none, standard, full}; every probe point",
               "only the last layers lose k-NN accuracy", _b,
               notes={"cpu": "Verdicts are computed from the runs; 3 seeds."}),
Experiment("C", "number of fixed views n", "augment fullfixed:n:same, n ∈ scale's list, plus full (n=∞)",
               "larger n: better k-NN, harder to fit the random labels", _c, x_label="views per image n",
               plots=("tradeoff",),
               notes={"cpu": "Verdicts are computed from the runs; 3 seeds. Within 500 epochs every finite n may still be "
                      "memorized."}),
    Experiment("D", "augmentation strength", "augment strength:a (RandAugment) and the named sets",
               "the same trade-off as C: stronger augmentation, better features, harder fit", _d,
               x_label="RandAugment strength a", plots=("tradeoff",),
               notes={"cpu": "Verdicts are computed from the runs; 2 seeds."}),
    Experiment("E", "random label per view", "augment fullfixed:n:random (one label per view)",
               "fitting fails as N·n grows (capacity)", _e, x_label="views per image n", plots=("fit_vs_views",),
               notes={"cpu": "Verdicts are computed from the runs; 3 seeds. The control is C's label-per-image run at "
                      "the same n and steps."}),
    Experiment("F", "capacity", "projector width B, training images N, encoder width",
               "wide heads memorize; fewer samples are memorized more malignly", _f, plots=("capacity",),
               notes={"cpu": "Verdicts are computed from the runs; 2 seeds. One 8,000-image probe reference and the same queries for "
                      "every variant; the data-size axis also at equal optimizer steps."}),
    Experiment("G", "i.i.d. views", "iid_views m: each load shows one of m other real images of the same true class",
               "strong features despite random labels", _g, x_label="same-class images per anchor m",
               notes={"cpu": "Verdicts are computed from the runs; 3 seeds. Judged only where the runs do not fit their labels one "
                      "by one."}),
    Experiment("H", "partial label noise", "label_noise p ∈ [0, 1], full aug",
               "between the clean and the random-label runs", _h, x_label="label noise p", plots=("tradeoff",),
               notes={"cpu": "Verdicts are computed from the runs; 3 seeds."}),
    Experiment("I", "mixup", "mixup p=0.8 (label kept) and cutmix p=0.8, no aug",
               "to be measured", _i,
               notes={"cpu": "Verdicts are computed from the runs; 2 seeds."}),
    Experiment("J", "re-initialize the last layers", "reinit of the last block(s) and/or the head of a trained "
               "random-label network, retrained on new random labels without augmentation",
               "the earlier layers keep the features", _j, x_label="blocks reset",
               notes={"cpu": "Verdicts are computed from the runs; 3 seeds."}),
    Experiment("K", "clean-label and untrained baselines", "label_noise 0 with full and no aug; the epoch-0 probe",
               "the bounds the other experiments are read against", _k,
               notes={"cpu": "Verdicts are computed from the runs; 2 seeds."}),
]}

# What `show` and `run` accept by id: the protocol's A–K (`all`) and the main job.
SPECS: dict[str, Experiment] = {**EXPERIMENTS, MAIN_JOB.id: MAIN_JOB}
