"""`--cuda-graph`: the training step (forward, loss, backward, optimizer step) captured once in a CUDA graph on
static input/target buffers and replayed every step, so a step costs one graph launch instead of hundreds of
kernel launches from Python.

Owns `CudaGraphStep` and `check_cuda_graph` (which combinations it refuses, and why). Not here: the eager step
(loop.py's `train_step`) and the optimizer's construction (build.py makes Adam capturable under --cuda-graph).

The recipe is PyTorch's whole-network capture (torch.cuda.graphs docs): the first `warmup_steps` steps run
eagerly on a side stream — real training steps on the run's first batches, so the trajectory is the eager
one's — then the next step is captured and every step copies its batch into the static buffers and replays.
Replay runs the very kernels the eager step runs, in the same order; autocast's weight-cast cache is off
(required under capture), which recomputes the same casts and changes no value.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import torch

from fastmem.errors import fail

# (images, targets) -> (loss, output): one optimisation step, as loop.py's `run_epoch` calls it.
StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Eager steps before the capture: PyTorch's recipe uses 3 (11 under DDP, which is refused here); lazy state
# (Adam's moments, cuDNN's algorithm choice, torch.compile's kernels) is created in them, outside the capture.
WARMUP_STEPS = 3
# torch.compile modes that capture CUDA graphs themselves: a graph cannot be captured inside another one.
SELF_GRAPHING_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def check_cuda_graph(device: torch.device, dtype: torch.dtype | None, compile_model: bool, compile_mode: str,
                     world: int) -> None:
    """One line naming the first knob --cuda-graph cannot work with (called only when it is on)."""
    if device.type != "cuda":
        fail(f"--cuda-graph needs a CUDA device (this run's device is {device.type}); drop it or use --device cuda")
    if dtype == torch.float16:
        fail("--cuda-graph does not support fp16: its grad scaler syncs with the host and skips steps; "
             "use --precision bf16 or fp32")
    if compile_model and compile_mode in SELF_GRAPHING_COMPILE_MODES:
        fail(f"--cuda-graph with --compile-mode {compile_mode}: that mode captures CUDA graphs itself; use one or "
             "the other (or --compile-mode default / max-autotune-no-cudagraphs with --cuda-graph)")
    if world > 1:
        fail(f"--cuda-graph is not supported under torchrun ({world} ranks): DDP's gradient all-reduce is not "
             "captured; drop --cuda-graph or run one process")


class CudaGraphStep:
    """A `StepFn` that warms up eagerly, captures one training step in a CUDA graph and then replays it.

    The returned loss is a fresh tensor per step; the returned output is the graph's static output buffer,
    valid until the next step (the loop reads its argmax at once, in stream order).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 dtype: torch.dtype | None, warmup_steps: int = WARMUP_STEPS) -> None:
        self.model, self.optimizer, self.loss_fn, self.dtype = model, optimizer, loss_fn, dtype
        self.warmup_steps = warmup_steps
        self.device = next(model.parameters()).device
        self.steps_run = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_images: torch.Tensor | None = None
        self.static_targets: torch.Tensor | None = None
        self.static_loss: torch.Tensor | None = None
        self.static_output: torch.Tensor | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        static_images, static_targets = self._stage(images, targets)
        self.steps_run += 1
        if self.graph is None and self.steps_run <= self.warmup_steps:
            return self._eager_on_side_stream(static_images, static_targets)
        if self.graph is None:
            self._capture(static_images, static_targets)
        assert self.graph is not None and self.static_loss is not None and self.static_output is not None
        self.graph.replay()
        return self.static_loss.clone(), self.static_output

    def _stage(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the batch into the static buffers (allocated like the first batch, memory format included)."""
        if self.static_images is None or self.static_targets is None:
            self.static_images = torch.empty_like(images, device=self.device)
            self.static_targets = torch.empty_like(targets, device=self.device)
        elif images.shape != self.static_images.shape or targets.shape != self.static_targets.shape:
            fail(f"--cuda-graph: a batch of {tuple(images.shape)} images after batches of "
                 f"{tuple(self.static_images.shape)}; the captured step needs every batch alike (drop --cuda-graph)")
        self.static_images.copy_(images, non_blocking=True)
        self.static_targets.copy_(targets, non_blocking=True)
        return self.static_images, self.static_targets

    def _autocast(self) -> ContextManager[object]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype, cache_enabled=False)

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's operations, as loop.py's `train_step` does them (its grad scaler is off: bf16 or fp32)."""
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates fresh grads: in the graph's pool under capture
        with self._autocast():
            output = self.model(images)
        loss = self.loss_fn(output, targets)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), output.detach()

    def _eager_on_side_stream(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A real training step on a side stream (lazy state and allocations made before the capture)."""
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side), warnings.catch_warnings():
            # A capturable optimizer warns when it steps outside a capture: here it does so on purpose.
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            loss, output = self._step(images, targets)
        current.wait_stream(side)
        return loss, output

    def _capture(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Record one step in a CUDA graph (nothing runs while capturing; the replay that follows does it)."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's threads (pinning, DALI, prefetch) may keep using CUDA during the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_loss, self.static_output = self._step(images, targets)
        self.graph = graph  # only a completed capture is replayed
