"""`--precision auto` on a CPU: one decision per machine, made once, that every process of a job shares.

The rule (DESIGN.md, "Precision on a CPU"):
1. A CPU without native bf16 (no `amx_bf16` / `avx512_bf16` flag) trains in fp32; nothing is measured. Without
   native bf16, autocast emulates it and the CPU models' steps run slower (measured: 0.54-1.05× fp32).
2. With native bf16, the *representative* step decides: the `cpu` scale's own model (conv4 ×0.5, B = 4,096,
   28×28 grey images, channels_last, MSE, forward + backward) timed on one thread in interleaved rounds
   (fp32 then bf16, then bf16 then fp32, ...); the ratio of each round is taken and the decision uses their
   median, so a load that slows one round slows both of its halves. bf16 iff the median ≥ `MIN_SPEEDUP`.
   A median within `MARGIN` of the threshold measures more rounds (up to `MAX_ROUNDS`) before deciding.
   On the machines seen so far the step's ratio is far from the threshold (1.9-3× with native bf16), which is
   what makes the answer stable; the tiny step measured before gave 0.97-1.46× on one machine.
3. The decision is kept per machine identity (CPU model, bf16 flags, torch version) in
   `$XDG_CACHE_HOME/fastmem/cpu-precision.json`, written under an exclusive file lock: concurrent first runs
   wait for one measurement and then all read it. A parent process that has decided (the sweep runner, the
   demo) hands its decision to its children in `$FASTMEM_CPU_PRECISION` (JSON), which wins over the cache when
   it names the same machine; under torchrun rank 0 decides and broadcasts (fastmem/train/build.py).

`$FASTMEM_CPUINFO` names a file read in place of /proc/cpuinfo: the tests fake CPU flags with it.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastmem.errors import FastmemError
from fastmem.io_utils import write_json_atomic

# CPU features that execute bf16 natively (AMX tiles, AVX-512 BF16); without them bf16 is emulated and slow.
BF16_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
MIN_SPEEDUP = 1.25  # bf16 must make the representative step at least this much faster
MARGIN = 0.15  # a median within ±15 % of MIN_SPEEDUP is measured again with more rounds
ROUNDS = 5  # interleaved rounds of the first measurement
MAX_ROUNDS = 15  # at most this many when the median is near the threshold
BATCH = 256  # the cpu scale's batch: small batches are dominated by per-call overheads that bf16 does not speed up
CPUINFO_ENV = "FASTMEM_CPUINFO"
DECISION_ENV = "FASTMEM_CPU_PRECISION"


@dataclass(frozen=True)
class CpuPrecisionChoice:
    """What `--precision auto` chose on this CPU, and why (recorded in every run's config.json)."""

    precision: str  # "bf16" or "fp32"
    reason: str
    cpu: str = ""  # the machine identity it was decided for

    @property
    def dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    @property
    def name(self) -> str:
        return self.precision

    def to_env(self) -> str:
        return json.dumps(asdict(self))


def read_cpuinfo() -> str:
    """/proc/cpuinfo, or the file `$FASTMEM_CPUINFO` names (tests fake CPU flags with it); '' where unreadable."""
    try:
        return Path(os.environ.get(CPUINFO_ENV) or "/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_bf16_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The native-bf16 CPU flags of this machine (or of `cpuinfo`'s text)."""
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return tuple(flag for flag in BF16_FLAGS if flag in flags)


def cpu_model_name(cpuinfo: str | None = None) -> str:
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                "unknown CPU")


def machine_identity() -> str:
    """The key of the kept decision: CPU model, its native-bf16 flags and the torch version."""
    return f"{cpu_model_name()} | {','.join(cpu_bf16_flags()) or 'no bf16 flags'} | torch {torch.__version__}"


@dataclass(frozen=True)
class Measurement:
    """fp32 time / bf16 time of the representative step, one ratio per interleaved round."""

    ratios: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def describe(self) -> str:
        low, high = min(self.ratios), max(self.ratios)
        return f"median {self.median:.2f}× over {len(self.ratios)} interleaved rounds (range {low:.2f}-{high:.2f}×)"


def _representative_step() -> Callable[[torch.dtype | None], float]:
    """A timer of one training step (forward + MSE + backward) of the cpu scale's model, in a given autocast."""
    from fastmem.models import create_model  # the models sit above this module in the import order

    generator = torch.Generator().manual_seed(0)
    net = create_model("conv4", num_classes=10, in_channels=1, image_size=28, width=0.5, bottleneck_dim=4096)
    net = net.to(memory_format=torch.channels_last)
    images = torch.rand(BATCH, 1, 28, 28, generator=generator).contiguous(memory_format=torch.channels_last)
    targets = torch.nn.functional.one_hot(torch.randint(0, 10, (BATCH,), generator=generator), 10).float()

    def step(dtype: torch.dtype | None) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.mse_loss(net(images).float(), targets)
        loss.backward()
        net.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    return step


def measure_bf16_speedup(rounds: int = ROUNDS, step: Callable[[torch.dtype | None], float] | None = None,
                         previous: Measurement | None = None) -> Measurement:
    """Time the representative step in fp32 and bf16 in `rounds` interleaved rounds (one torch thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the cpu scale trains with, and less exposed to a busy second core
    try:
        step = step or _representative_step()
        if previous is None:
            step(None), step(torch.bfloat16)  # warm-up: oneDNN's kernels are chosen on the first call
        ratios = list(previous.ratios) if previous else []
        for r in range(rounds):
            if (len(ratios) + r) % 2 == 0:
                fp32, bf16 = step(None), step(torch.bfloat16)
            else:
                bf16, fp32 = step(torch.bfloat16), step(None)
            ratios.append(fp32 / bf16)
        return Measurement(tuple(ratios))
    finally:
        torch.set_num_threads(threads)


def decide(flags: tuple[str, ...], measure: Callable[..., Measurement] = measure_bf16_speedup) -> CpuPrecisionChoice:
    """The rule of this module's docstring, on given flags, with a (fakeable) measurement."""
    identity = machine_identity()
    if not flags:
        return CpuPrecisionChoice("fp32", "fp32: this CPU has no native bf16 (no amx_bf16 or avx512_bf16 flag)",
                                  identity)
    measured = measure(ROUNDS)
    while abs(measured.median / MIN_SPEEDUP - 1) < MARGIN and len(measured.ratios) < MAX_ROUNDS:
        measured = measure(ROUNDS, previous=measured)
    verdict = "bf16" if measured.median >= MIN_SPEEDUP else "fp32"
    reason = (f"{verdict}: native bf16 ({', '.join(flags)}); fp32 time / bf16 time of the cpu scale's conv4 "
              f"training step: {measured.describe()} (bf16 needs ≥ {MIN_SPEEDUP}×)")
    return CpuPrecisionChoice(verdict, reason, identity)


def decision_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastmem" / "cpu-precision.json"


def _read_kept(text: str | None, identity: str) -> CpuPrecisionChoice | None:
    if not text:
        return None
    try:
        saved = json.loads(text)
        if saved.get("cpu") == identity and saved.get("precision") in ("bf16", "fp32"):
            return CpuPrecisionChoice(saved["precision"], str(saved["reason"]), identity)
    except (ValueError, AttributeError, TypeError):
        pass
    return None


def _kept_in_file(path: Path, identity: str) -> CpuPrecisionChoice | None:
    try:
        return _read_kept(path.read_text(), identity)
    except OSError:
        return None


def decide_once(measure: Callable[..., Measurement] = measure_bf16_speedup) -> CpuPrecisionChoice:
    """This machine's decision: from the parent's hand-over, else the kept file, else measured under the lock."""
    identity = machine_identity()
    handed = _read_kept(os.environ.get(DECISION_ENV), identity)
    if handed is not None:
        return handed
    flags = cpu_bf16_flags()
    if not flags:
        return decide(flags, measure)
    cache = decision_cache()
    kept = _kept_in_file(cache, identity)
    if kept is not None:
        return kept
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock = open(cache.with_suffix(".lock"), "a")  # noqa: SIM115 - held across the measurement
    except OSError:
        return decide(flags, measure)  # no writable cache: decide in this process alone
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first runs wait here for one measurement
        kept = _kept_in_file(cache, identity)
        if kept is not None:
            return kept
        choice = decide(flags, measure)
        try:
            write_json_atomic(cache, asdict(choice))
        except (OSError, FastmemError):
            pass  # unwritable: the next process measures again
        return choice


@functools.cache
def cpu_precision_choice() -> CpuPrecisionChoice:
    """`--precision auto` on this CPU, decided once per process (and once per machine: `decide_once`)."""
    return decide_once()
