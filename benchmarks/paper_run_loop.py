"""The timed half of benchmarks/paper_run.py: the paper's training loop, probed on its schedule, under a time cap.

Owns `run_half`: build the model (fastmem's factory), warm up untimed, probe the untrained network,
then train epoch after epoch until the training time reaches the cap — probing again every
`probe_every` completed epochs — and split the wall time into waiting for the next batch (loader),
the rest of the training loop (step: the trainer's own step — loop.py's `train_step`, or its CUDA-graph
replay, cuda_graph.py — plus the per-step bookkeeping run_epoch does) and the probe. Both halves (ours
and the reference setup) run through this one loop; they differ only in the loader, step (optimizer,
precision, capture), memory format and probe they get.

Loader time on CUDA is measured without a host sync per step: CUDA events around each `next()` give
the stream's time between them — the loader's kernels and the GPU's idle time while the host waits
for a batch, which is what the loader adds to the wall time. On CPU it is the host time in `next()`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from fastmem.models import EncoderProjector, create_model

# (model, rows) -> k-NN accuracy (0–1) per probe point; rows > 0: only the first `rows` references and queries
Probe = Callable[[EncoderProjector, int], dict[str, float]]
WARMUP_PROBE_ROWS = 1024  # an untimed probe of this many rows first: imports, kernel builds, autotuning
StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (images, targets) -> (loss, output)


@dataclass(frozen=True)
class RunShape:
    """What both halves share: the model, the batch, the time cap and the probe schedule."""

    model: str
    width: float
    bottleneck_dim: int
    num_classes: int
    image_size: int
    batch_size: int
    seconds: float  # training seconds (loader + step) per half; probes come on top
    warmup_steps: int
    probe_every: int
    progress: bool


@dataclass(frozen=True)
class HalfSetup:
    """One half of the comparison: how it loads, steps (optimizer, precision, capture) and probes."""

    name: str
    describe: str  # one line for the table: pipeline, precision, memory format, probe
    make_loader: Callable[[], Any]  # a contract loader: set_epoch, len, close, iteration yields .images/.targets
    make_step: Callable[[EncoderProjector], StepFn]  # the optimisation step over the model's parameters
    channels_last: bool
    probe: Probe


@dataclass
class HalfResult:
    """Measured figures of one half (seconds), and the projection of a whole run from them."""

    name: str
    describe: str
    batch_size: int
    steps_per_epoch: int
    steps: int = 0
    train_s: float = 0.0  # wall time of the training loop: loader + step
    loader_s: float = 0.0
    probe_s: list[float] = field(default_factory=list)
    probe_epochs: list[int] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)  # of the last probe

    @property
    def step_s(self) -> float:
        return self.train_s - self.loader_s

    @property
    def images_per_s(self) -> float:
        return self.steps * self.batch_size / self.train_s

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch

    def per_epoch(self) -> dict[str, float]:
        """Seconds per epoch: whole, loader and step (from the mean step, times the steps of an epoch)."""
        scale = self.steps_per_epoch / self.steps
        return {"epoch_s": self.train_s * scale, "loader_s": self.loader_s * scale, "step_s": self.step_s * scale}

    def projection(self, epochs: int, probe_every: int) -> dict[str, float]:
        """Wall time of an `epochs`-epoch run probed every `probe_every` epochs, and its shares."""
        per = self.per_epoch()
        probes = epochs // probe_every
        probe_mean = sum(self.probe_s) / len(self.probe_s)
        parts = {"loader": epochs * per["loader_s"], "step": epochs * per["step_s"], "probe": probes * probe_mean}
        total = sum(parts.values())
        return {"epochs": epochs, "probes": probes, "probe_mean_s": probe_mean, "total_s": total,
                **{f"{name}_s": value for name, value in parts.items()},
                **{f"{name}_share": value / total for name, value in parts.items()}}


class LoaderClock:
    """Time spent getting the next batch: CUDA-event time on the stream, or host time on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.seconds = 0.0

    def next(self, batches: Iterator[Any]) -> Any:
        if not self.cuda:
            started = time.perf_counter()
            batch = next(batches)
            self.seconds += time.perf_counter() - started
            return batch
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        batch = next(batches)
        after.record()
        self.pending.append((before, after))
        return batch

    def settle(self) -> None:
        """Add the events recorded so far (call after a synchronize)."""
        self.seconds += sum(before.elapsed_time(after) for before, after in self.pending) / 1e3
        self.pending.clear()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: RunShape, setup: HalfSetup, device: torch.device) -> EncoderProjector:
    torch.manual_seed(0)
    model = create_model(shape.model, num_classes=shape.num_classes, in_channels=3, image_size=shape.image_size,
                         width=shape.width, bottleneck_dim=shape.bottleneck_dim).to(device)
    return model.to(memory_format=torch.channels_last if setup.channels_last else torch.contiguous_format)


def run_half(shape: RunShape, setup: HalfSetup, device: torch.device, log: Callable[[str], None]) -> HalfResult:
    """Warm up, probe the untrained net, then train until `shape.seconds` of training, probing on schedule."""
    model = build_model(shape, setup, device)
    optimisation_step = setup.make_step(model)
    loader = setup.make_loader()
    result = HalfResult(setup.name, setup.describe, shape.batch_size, len(loader))
    if result.steps_per_epoch < 1:
        raise ValueError("the loader has no whole batch")  # checked by the caller's flags already

    def step(batch: Any, fits: torch.Tensor) -> None:  # what the trainer's run_epoch does per batch, minus mixing
        loss, output = optimisation_step(batch.images, batch.targets)
        losses.append(loss.detach())
        fits.add_((output.detach().argmax(dim=1) == batch.targets).sum())

    def probe(epoch: int) -> None:
        synchronize(device)
        started = time.perf_counter()
        result.accuracy = setup.probe(model, 0)
        synchronize(device)
        result.probe_s.append(time.perf_counter() - started)
        result.probe_epochs.append(epoch)
        model.train()
        shown = "  ".join(f"{layer} {value:.1%}" for layer, value in result.accuracy.items())
        log(f"{setup.name}: probe at epoch {epoch}: {result.probe_s[-1]:.2f} s; k-NN {shown}")

    model.train()
    losses: list[torch.Tensor] = []
    fits = torch.zeros((), dtype=torch.int64, device=device)
    loader.set_epoch(0)
    batches = iter(loader)
    for _ in range(shape.warmup_steps):  # allocation, autotuning, compilation, worker start: not timed
        step(next(batches), fits)
    batches.close()  # ends the iteration now (a generator's `finally` stops its backend's work)
    setup.probe(model, WARMUP_PROBE_ROWS)
    probe(0)  # the untrained network (fastmem probes it; the reference code does not, its cost is the same)

    clock = LoaderClock(device)
    bar = tqdm(total=shape.seconds, desc=setup.name, unit="s", disable=not shape.progress, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of training{postfix}")
    epoch, done = 0, False
    while not done:
        epoch += 1
        loader.set_epoch(epoch)
        losses, fits = [], torch.zeros((), dtype=torch.int64, device=device)
        synchronize(device)
        started = time.perf_counter()
        batches = iter(loader)
        for _ in range(result.steps_per_epoch):
            step(clock.next(batches), fits)
            result.steps += 1
            elapsed = result.train_s + time.perf_counter() - started
            bar.update(min(elapsed, shape.seconds) - bar.n)
            if elapsed >= shape.seconds:
                done = True
                break
        batches.close()
        synchronize(device)
        result.train_s += time.perf_counter() - started
        clock.settle()
        result.loader_s = clock.seconds
        if losses:  # the epoch's loss and fit are read once, as the trainer does
            seen = len(losses) * shape.batch_size
            bar.set_postfix_str(f"epoch {epoch}, loss {float(torch.stack(losses).mean()):.4f}, "
                                f"fit {float(fits) / seen:.1%}, {result.images_per_s:,.0f} img/s", refresh=False)
        if not done and epoch % shape.probe_every == 0:
            probe(epoch)
    bar.close()
    loader.close()  # its worker processes, threads or pipelines
    return result
