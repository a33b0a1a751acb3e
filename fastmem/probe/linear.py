"""Linear probe: multinomial logistic regression on frozen features, with one fixed protocol.

Protocol (every number below is a module constant; `LinearProbe.info` records them with the outcome):
1. Features: each row is L2-normalised (a zero row stays zero); all arithmetic is float64 on the CPU
   (inputs of any float dtype — float32 or the cache's float16 — are cast first).
2. Model: logits = x·Wᵀ + b (W: K × D, b: K). Objective, minimised exactly (full batch):
       f(W, b) = (1/n) Σᵢ CE(softmax(xᵢWᵀ + b), yᵢ) + (λ/2)·‖W‖²_F      (the bias is not penalised)
   solved by torch.optim.LBFGS (strong-Wolfe line search, history HISTORY_SIZE, at most MAX_ITER
   iterations and MAX_EVAL evaluations; it stops when max |∇f| ≤ TOLERANCE_GRAD, or when a step
   changes f or the parameters by less than TOLERANCE_CHANGE), from W = 0, b = 0, on `threads`
   torch threads (default 1).
3. λ is chosen from a fixed log-spaced grid (DEFAULT_GRID) on a held-out 20 % of the training rows:
   the rows are shuffled with numpy's default_rng(seed), grouped by class (stable sort, so the order
   within a class stays random), and every 5th row from a seeded offset is held out — a stratified
   split (each class ≈ 20 %, off by at most one row). The grid is fitted on the other 80 % from the
   largest λ to the smallest, each fit warm-started from the previous one (a regularisation path);
   the λ with the highest held-out accuracy wins (ties: lower held-out cross-entropy, then larger λ).
   A one-value grid skips the split.
4. Refit on all training rows with the chosen λ (warm-started from the 80 % fit at that λ); queries
   are classified by argmax of the logits (ties: the lower class index).
Same inputs, seed and `threads` → the same bits (there is no randomness besides the seeded split).

scikit-learn equivalence: LogisticRegression (solver lbfgs, l1_ratio=0 i.e. L2, fit_intercept=True,
multinomial when the labels hold K ≥ 3 classes) minimises
    C·Σᵢ CE_i + ½‖W‖²   ≡ (divided by C·n)   (1/n)·Σᵢ CE_i + (1/(2·C·n))·‖W‖²
(its code: the mean loss plus l2_reg_strength = 1/(C·sw_sum), intercept unpenalised), so our λ is
C = 1/(λ·n_train). With only 2 classes present sklearn fits one vector w = w₁ − w₀ (the optimum of
ours has w₀ = −w₁, penalty (λ/4)‖w‖²), so there C = 2/(λ·n_train). `sklearn_C` applies both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastmem.errors import fail

DEFAULT_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # λ, log-spaced, features of unit norm
HELDOUT_EVERY = 5  # every 5th row of the class-grouped shuffled order is held out: 20 %
MAX_ITER = 2000
MAX_EVAL = 2 * MAX_ITER  # function evaluations, line searches included
TOLERANCE_GRAD = 1e-6  # on max |∂f|, f the per-sample mean objective
TOLERANCE_CHANGE = 1e-12
HISTORY_SIZE = 40  # L-BFGS pairs kept: 2·40·K·(D+1) float64 (26 MB for K = 10, D = 4,096)


def sklearn_C(l2: float, n_train: int, classes_present: int = 3) -> float:
    """scikit-learn's LogisticRegression C for our λ on n_train rows: 1/(λ·n_train), 2/(λ·n_train) for 2 classes."""
    return (2.0 if classes_present == 2 else 1.0) / (l2 * n_train)


def normalize_rows(x: np.ndarray) -> torch.Tensor:
    """float64 rows of unit L2 norm (a zero row stays zero), as a CPU tensor."""
    rows = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: weights (K, D) and bias (K,) over unit-norm rows, with how λ was chosen."""

    weight: np.ndarray
    bias: np.ndarray
    l2: float  # the chosen λ
    l2_grid: tuple[float, ...]
    heldout_accuracy: tuple[float, ...]  # per λ of l2_grid, on the held-out 20 % (empty for a one-value grid)
    heldout_loss: tuple[float, ...]  # mean cross-entropy per λ on the held-out rows
    seed: int  # the split seed
    n_train: int
    n_heldout: int
    classes_present: int  # distinct labels among the training rows (sklearn's binary case: 2)
    iterations: int  # L-BFGS iterations of the refit
    converged: bool = field(default=True)  # every fit (grid and refit) stopped on a tolerance, not on MAX_ITER/MAX_EVAL

    @property
    def sklearn_C(self) -> float:
        """The equivalent scikit-learn LogisticRegression C for the refit (`sklearn_C`: 1/(λ·n_train), or 2/(λ·n_train)
        when only 2 classes are present)."""
        return sklearn_C(self.l2, self.n_train, self.classes_present)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, K) float64 logits of rows `x` (normalised here like the training rows)."""
        rows = _check_features(x, "query features", self.weight.shape[1])
        return (normalize_rows(rows) @ torch.from_numpy(self.weight).T + torch.from_numpy(self.bias)).numpy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The predicted class (int64) of every row of `x`."""
        return self.logits(x).argmax(axis=1).astype(np.int64)

    def info(self) -> dict[str, Any]:
        """The protocol's record: grid, split seed, chosen λ and its sklearn C, held-out scores, solver."""
        return {"l2": self.l2, "sklearn_C": self.sklearn_C, "l2_grid": list(self.l2_grid),
                "heldout_accuracy": list(self.heldout_accuracy), "heldout_loss": list(self.heldout_loss),
                "split_seed": self.seed, "n_train": self.n_train, "n_heldout": self.n_heldout,
                "iterations": self.iterations, "converged": self.converged, "max_iter": MAX_ITER,
                "tolerance_grad": TOLERANCE_GRAD, "history_size": HISTORY_SIZE,
                "heldout": f"class-stratified 1 in {HELDOUT_EVERY}", "features": "L2-normalised rows, float64"}


def _check_features(x: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        fail(f"linear probe: {what} must be a non-empty 2-D array (rows × dims), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        fail(f"linear probe: {what} must be numeric, got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        fail(f"linear probe: {what} have {x.shape[1]} dims, the probe was fitted on {dim}")
    if not np.isfinite(x).all():
        fail(f"linear probe: {what} contain NaN or infinity")
    return x


def _check_labels(y: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        fail(f"linear probe: labels must be a 1-D integer array, got dtype {y.dtype} and shape {y.shape}")
    if y.shape[0] != n:
        fail(f"linear probe: {y.shape[0]} labels for {n} feature rows")
    if num_classes < 2:
        fail(f"linear probe: num_classes must be at least 2, got {num_classes}")
    if y.min() < 0 or y.max() >= num_classes:
        fail(f"linear probe: labels must lie in [0, {num_classes}), found {int(y.min())}..{int(y.max())}")
    return y.astype(np.int64)


def heldout_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows), sorted: a seeded, class-stratified 1-in-HELDOUT_EVERY split (module doc, step 3)."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(labels.shape[0])
    grouped = shuffled[np.argsort(labels[shuffled], kind="stable")]
    held = np.zeros(labels.shape[0], dtype=bool)
    held[grouped[int(rng.integers(HELDOUT_EVERY))::HELDOUT_EVERY]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def _solve(x: torch.Tensor, y: torch.Tensor, l2: float, weight: torch.Tensor, bias: torch.Tensor) -> tuple[int, bool]:
    """Minimise the objective of the module doc in place from (weight, bias); (iterations, converged).

    The gradient is written out rather than taken by autograd (a third less time per evaluation):
    ∂f/∂W = (P − Y)ᵀX/n + λW and ∂f/∂b = Σᵢ(Pᵢ − Yᵢ)/n, with P the softmax and Y the one-hot labels.
    Logits are held class-major (K × n): torch's log_softmax along the long axis of a K × n array is
    ~10× faster than along the 10-wide rows of n × K, and W·Xᵀ beats X·Wᵀ for a skinny W.
    """
    targets = F.one_hot(y, weight.shape[0]).T.to(x.dtype)  # K × n
    n = x.shape[0]
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=MAX_ITER, max_eval=MAX_EVAL,
                                  tolerance_grad=TOLERANCE_GRAD, tolerance_change=TOLERANCE_CHANGE,
                                  history_size=HISTORY_SIZE, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        log_probs = torch.addmm(bias[:, None], weight, x.T).log_softmax(dim=0)
        loss = -(log_probs * targets).sum() / n + 0.5 * l2 * weight.square().sum()
        residual = log_probs.exp_().sub_(targets).div_(n)
        weight.grad = torch.addmm(weight, residual, x, beta=l2)
        bias.grad = residual.sum(dim=1)
        return loss

    optimizer.step(closure)
    state = optimizer.state[weight]
    iterations = int(state.get("n_iter", 0))
    return iterations, iterations < MAX_ITER and int(state.get("func_evals", 0)) < MAX_EVAL


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` for the block, then restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _scores(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a fit on rows x."""
    logits = torch.addmm(bias, x, weight.T)
    return float((logits.argmax(1) == y).double().mean()), float(F.cross_entropy(logits, y))


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, *, seed: int = 0,
                     l2_grid: tuple[float, ...] = DEFAULT_GRID, threads: int = 1) -> LinearProbe:
    """Fit the probe by the module's protocol: λ from `l2_grid` on a seeded stratified held-out 20 %, then refit.

    `train_x`: (N, D) features (any float dtype; rows are L2-normalised here); `train_y`: (N,) integer
    labels in [0, num_classes). `threads`: torch threads for the solver, restored afterwards (default 1:
    results do not depend on the caller's thread setting, and a shared machine causes no OpenMP barrier
    stalls — with libgomp's default spinning, 2 threads ran the 2,000 × 256 protocol 7× slower than 1
    at load average 5; more threads pay only for large N·D). User mistakes raise a one-line FastmemError.
    """
    x_np = _check_features(train_x, "training features")
    y_np = _check_labels(train_y, x_np.shape[0], num_classes)
    grid = tuple(float(v) for v in l2_grid)
    if not grid or not all(np.isfinite(v) and v > 0 for v in grid):
        fail(f"linear probe: the λ grid must be non-empty positive numbers, got {l2_grid}")
    if threads < 1:
        fail(f"linear probe: threads must be at least 1, got {threads}")
    with _torch_threads(threads):
        return _fit(normalize_rows(x_np), y_np, num_classes, seed, grid)


def _fit(x: torch.Tensor, y_np: np.ndarray, num_classes: int, seed: int, grid: tuple[float, ...]) -> LinearProbe:
    """Steps 3 and 4 of the module doc on validated, normalised rows."""
    y = torch.from_numpy(y_np)
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    bias = torch.zeros(num_classes, dtype=torch.float64)
    accuracy: dict[float, float] = {}
    loss: dict[float, float] = {}
    fitted: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    n_heldout = 0
    chosen = grid[0]
    grid_converged = True
    if len(grid) > 1:
        fit_rows, held_rows = (torch.from_numpy(rows) for rows in heldout_split(y_np, seed))
        if len(held_rows) == 0 or len(fit_rows) == 0:
            fail(f"linear probe: {x.shape[0]} training rows are too few to hold out 20 % for choosing λ")
        n_heldout = len(held_rows)
        fit_x, fit_y, held_x, held_y = x[fit_rows], y[fit_rows], x[held_rows], y[held_rows]
        for l2 in sorted(set(grid), reverse=True):  # the regularisation path, strongest first
            grid_converged &= _solve(fit_x, fit_y, l2, weight, bias)[1]
            accuracy[l2], loss[l2] = _scores(held_x, held_y, weight, bias)
            fitted[l2] = (weight.clone(), bias.clone())
        chosen = max(grid, key=lambda v: (accuracy[v], -loss[v], v))
        weight, bias = (t.clone() for t in fitted[chosen])
    iterations, converged = _solve(x, y, chosen, weight, bias)
    return LinearProbe(weight=weight.numpy(), bias=bias.numpy(), l2=chosen, l2_grid=grid,
                       heldout_accuracy=tuple(accuracy[v] for v in grid if v in accuracy),
                       heldout_loss=tuple(loss[v] for v in grid if v in loss), seed=seed, n_train=int(x.shape[0]),
                       n_heldout=n_heldout, classes_present=len(np.unique(y_np)), iterations=iterations, converged=converged and grid_converged)


def linear_probe_predictions(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, num_classes: int,
                             seed: int = 0, l2_grid: tuple[float, ...] = DEFAULT_GRID,
                             threads: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-query predicted classes (int64, one per row of `query_x`) and the protocol's record (`LinearProbe.info`)."""
    dim = _check_features(train_x, "training features").shape[1]
    _check_features(query_x, "query features", dim)  # fail before the fit, not after it
    probe = fit_linear_probe(train_x, train_y, num_classes, seed=seed, l2_grid=l2_grid, threads=threads)
    return probe.predict(query_x), probe.info()


__all__ = ["DEFAULT_GRID", "HELDOUT_EVERY", "LinearProbe", "fit_linear_probe", "heldout_split",
           "linear_probe_predictions", "normalize_rows", "sklearn_C"]
