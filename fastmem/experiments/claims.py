"""PROTOCOL.md's claims, declared once per experiment as data (fastmem/report/judge.py computes their verdicts).

Each claim names the variants (by their labels in fastmem/experiments/specs.py), the probe point, the comparison and a
preregistered threshold, the baseline it is judged against and why, the preconditions of its regime, and how many
seeds it needs. The sweep writes them into every sweep.json, so a report re-rendered from committed records judges
them again without this module.

Baselines: a claim about what training did to the *weights* is judged against "untrained, BN calibrated" (the same
weights with BatchNorm statistics estimated on the training images: a trained network is probed with accumulated
statistics too); claims stated against "the untrained probe" as the paper's code would see it are also judged against
the epoch-0 probe (initial BN), and a report shows both.
"""

from __future__ import annotations

from collections.abc import Callable

from fastmem.report.judge import Claim, Condition, Measure

NOT_ONE_BY_ONE = 0.9  # below this fit, the random labels are not memorized one by one
MEMORIZED = 0.95  # at or above this fit, they are
SEEDS_3 = 3  # A, B, C, E, G, H, J (issue: single-seed effects sit inside the seeds' spread)
SEEDS_2 = 2  # the rest

WEIGHTS = ("against the calibrated untrained network: a trained network is probed with accumulated BN statistics, so "
           "this isolates what training did to the weights")
AS_PROBED = "against the epoch-0 probe (initial BN), the untrained network as the paper's protocol probes it"


def _lift(run: str, layer: str, baseline: str = "calibrated") -> Measure:
    return Measure("lift", run, layer=layer, baseline=baseline)


def _fit(run: str) -> Measure:
    return Measure("fit", run)


def _not_fit(run: str) -> Condition:
    return Condition(_fit(run), "<", NOT_ONE_BY_ONE, "the random labels are not memorized one by one")


def _memorized(run: str) -> Condition:
    return Condition(_fit(run), ">", MEMORIZED, "the random labels are memorized")


def _benign_malign(prefix: str, full: str, none: str, seeds: int) -> list[Claim]:
    claims = []
    for baseline, why in (("calibrated", WEIGHTS), ("initial", AS_PROBED)):
        tag = "" if baseline == "calibrated" else " (initial BN)"
        claims.append(Claim(f"{prefix}.benign{tag}", "with augmentation, random labels leave h above the untrained "
                            "network", _lift(full, "h", baseline), ">", 0.0, why, (_not_fit(full),), seeds))
        claims.append(Claim(f"{prefix}.malign{tag}", "without augmentation, the labels are memorized and h ends below "
                            "the untrained network", _lift(none, "h", baseline), "<", 0.0, why, (_memorized(none),), seeds))
    claims.append(Claim(f"{prefix}.z collapses", "without augmentation z loses at least 20 points", _lift(none, "z"),
                        "<", -0.20, WEIGHTS, (_memorized(none),), seeds))
    return claims


def _a(scale: str) -> list[Claim]:
    return _benign_malign("A", "random labels, full aug", "random labels, no aug", SEEDS_3)


def _main(scale: str) -> list[Claim]:
    return _benign_malign("MAIN", "full augmentation", "no augmentation", 1)


def _b(scale: str) -> list[Claim]:
    none = "random labels, no aug"
    return [
        Claim("B.early layers keep", "without augmentation an early stage (stage1) loses less than 2 points",
              _lift(none, "stage1"), ">", -0.02, WEIGHTS, (_memorized(none),), SEEDS_3),
        Claim("B.last layers lose", "without augmentation the projector's hidden layer loses more than 2 points",
              _lift(none, "head_hidden"), "<", -0.02, WEIGHTS, (_memorized(none),), SEEDS_3),
        Claim("B.standard aug benign", "standard augmentation (crop + flip) leaves h above the untrained network",
              _lift("random labels, standard aug", "h"), ">", 0.0, WEIGHTS, (), SEEDS_3),
    ]


def _c(scale: str) -> list[Claim]:
    return [
        Claim("C.harder to fit", "more fixed views are harder to fit: n = 20 fits less than n = 1",
              Measure("fit_difference", "n=20 views", other="n=1 views"), "<", 0.0,
              "same images, labels and steps; only the number of views differs", (), SEEDS_3),
        Claim("C.better k-NN (n=20)", "more fixed views give better features: h at n = 20 above n = 1",
              Measure("difference", "n=20 views", layer="h", other="n=1 views"), ">", 0.0,
              "paired over the same queries, same seed", (), SEEDS_3),
        Claim("C.better k-NN (n=∞)", "endless views give better features: h with the full set above n = 1",
              Measure("difference", "n=∞ (full aug)", layer="h", other="n=1 views"), ">", 0.0,
              "paired over the same queries, same seed", (), SEEDS_3),
    ]


def _d(scale: str) -> list[Claim]:
    return [
        Claim("D.harder to fit", "stronger RandAugment is harder to fit: a = 1 fits less than a = 0.25",
              Measure("fit_difference", "RandAugment a=1", other="RandAugment a=0.25"), "<", 0.0,
              "same images and steps; only the strength differs", (), SEEDS_2),
        Claim("D.better features", "stronger augmentation gives better features: h at a = 1 above no augmentation",
              Measure("difference", "RandAugment a=1", layer="h", other="no aug"), ">", 0.0,
              "paired over the same queries, same seed", (), SEEDS_2),
        Claim("D.RandAugment benign", "RandAugment at a = 1 leaves h above the untrained network",
              _lift("RandAugment a=1", "h"), ">", 0.0, WEIGHTS, (_not_fit("RandAugment a=1"),), SEEDS_2),
    ]


def _e(scale: str) -> list[Claim]:
    return [Claim(f"E.capacity (n={n})", f"a random label per view is harder to fit than one per image, at n = {n} "
                  "views (beyond C's drop)",
                  Measure("fit_difference", f"n={n}, label per view", other=f"n={n}, label per image (C)"), "<", 0.0,
                  "the control is C's run at the same n, images, seed and steps: only the labels per view differ",
                  (), SEEDS_3) for n in (10, 20)]


def _f(scale: str) -> list[Claim]:
    return [
        Claim("F.wide heads memorize", "a wider projector fits more of the random labels (B = 16,384 vs B = 0)",
              Measure("fit_difference", "B=16384", other="B=0"), ">", 0.0,
              "same encoder, data and steps; only the head differs",
              (Condition(_fit("B=16384"), ">", 0.5, "the full-augmentation run fits its labels at least halfway, so "
                         "head width can show in the fit"),), SEEDS_2),
        Claim("F.fewer samples more malign", "at equal optimizer steps, fewer training images leave h lower "
              "(N = 500 vs N = 8,000)",
              Measure("difference", "N=500, equal steps", layer="h", other="N=8000, equal steps"), "<", 0.0,
              "both train the base run's 3,500 steps, probed against one 8,000-image reference on the same queries",
              (), SEEDS_2),
    ]


def _g(scale: str) -> list[Claim]:
    claims = []
    for label in ("m=25 same-class images", "m=all (shared class pool)"):
        claims.append(Claim(f"G.strong features ({label.split(' ')[0]})", "i.i.d. same-class views leave h above the "
                            "untrained network despite random labels", _lift(label, "h"), ">", 0.0, WEIGHTS,
                            (_not_fit(label),), SEEDS_3))
    return claims


def _h(scale: str) -> list[Claim]:
    return [
        Claim("H.between (clean side)", "partial noise lies below clean labels: h at p = 0 above p = 0.5",
              Measure("difference", "noise p=0", layer="h", other="noise p=0.5"), ">", 0.0,
              "paired over the same queries, same seed", (), SEEDS_3),
        Claim("H.between (random side)", "partial noise lies above random labels: h at p = 0.5 above p = 1",
              Measure("difference", "noise p=0.5", layer="h", other="noise p=1"), ">", 0.0,
              "paired over the same queries, same seed", (), SEEDS_3),
    ]


def _i(scale: str) -> list[Claim]:
    return [Claim(f"I.{name} benign", f"{name} alone (p = 0.8, no augmentation) leaves h above the untrained network",
                  _lift(label, "h"), ">", 0.0, WEIGHTS, (), SEEDS_2)
            for name, label in (("mixup", "mixup p=0.8, no aug"), ("cutmix", "cutmix p=0.8, no aug"))]


def _j(scale: str) -> list[Claim]:
    scratch = "from scratch, no aug"
    return [Claim(f"J.earlier layers keep ({reset})", f"after resetting {reset} of the full-augmentation network and "
                  "retraining on new random labels without augmentation, h stays above the same retraining from scratch",
                  Measure("difference", f"reset {reset}", layer="h", other=scratch), ">", 0.0,
                  "same new labels, data and steps; only the starting weights differ",
                  (_memorized(f"reset {reset}"),), SEEDS_3) for reset in ("head", "stage4,head")]


def _k(scale: str) -> list[Claim]:
    return [Claim(f"K.clean labels ({aug})", f"clean labels with {aug} lift h above the untrained network",
                  _lift(label, "h"), ">", 0.0, WEIGHTS, (), SEEDS_2)
            for aug, label in (("full aug", "clean labels, full aug"), ("no aug", "clean labels, no aug"))]


CLAIMS: dict[str, Callable[[str], list[Claim]]] = {
    "A": _a, "B": _b, "C": _c, "D": _d, "E": _e, "F": _f, "G": _g, "H": _h, "I": _i, "J": _j, "K": _k, "MAIN": _main,
}


def claims_for(experiment_id: str, scale: str) -> list[Claim]:
    """The claims of an experiment at a scale (the same claims at every scale; the runs decide their regime)."""
    return CLAIMS[experiment_id](scale)
