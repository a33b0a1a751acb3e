"""Any torch model as a probe target: named layers of it become probe points the extraction understands.

`LayerProbe` wraps a model and a list of layer names into what `extract_embeddings` / `embed_split` expect
(`probe_points`, `forward_probes` giving (N, D) rows): torchvision's `create_feature_extractor` where the
model traces with torch.fx (every graph node — `layer4.1.relu_1` — and every module name — `layer4` —
is a valid layer; the graph is cut after the last one asked for), forward hooks on named modules where it
does not. Outputs are pooled like fastmem's own probe points: a (N, C, H, W) map by global average pooling,
(N, T, D) tokens by their mean, (N, D) as it is, anything else flattened. The input adapter runs inside the
wrapper, on the [0, 1] images extraction feeds it: 1-channel images are repeated to 3 channels when the
model's first convolution wants 3 (3 → 1 by the channel mean), an optional bilinear resize, and an optional
per-channel mean/std normalisation. Its settings are buffers, so the embedding cache's weight digest covers them.

`load_model('torchvision:NAME' | 'timm:NAME', weights)`: weights 'none' (seeded random init), a state-dict
file (read with torch.load(weights_only=True)), or a named pretrained set ('DEFAULT', 'IMAGENET1K_V1', …;
torchvision downloads it unless cached, timm's `pretrained=True` for any name but none/file).
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastmem.errors import fail

MODEL_SOURCES: tuple[str, ...] = ("torchvision", "timm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_model(spec: str, weights: str = "none") -> tuple[nn.Module, tuple[float, ...] | None, tuple[float, ...] | None]:
    """(the model, its input mean, its input std) for 'torchvision:NAME' or 'timm:NAME' (module doc)."""
    source, _, name = spec.partition(":")
    if source not in MODEL_SOURCES or not name:
        fail(f"--model {spec!r}: use torchvision:NAME or timm:NAME (e.g. torchvision:resnet18)")
    from_file = weights.lower() != "none" and (Path(weights).exists() or "/" in weights or weights.endswith((".pt", ".pth")))
    pretrained = None if weights.lower() == "none" or from_file else weights
    if source == "torchvision":
        model = _torchvision_model(name, pretrained)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        model, mean, std = _timm_model(name, pretrained)
    if from_file:
        load_weights_file(model, weights)
    return model, mean, std


def _torchvision_model(name: str, pretrained: str | None) -> nn.Module:
    import torchvision.models

    if name not in torchvision.models.list_models():
        fail(f"unknown torchvision model {name!r}; torchvision.models.list_models() names them (e.g. resnet18, vit_b_16)")
    try:
        return torchvision.models.get_model(name, weights=pretrained)
    except (ValueError, KeyError) as err:
        fail(f"torchvision:{name}: no weights {pretrained!r} ({str(err).splitlines()[0]}); use none, a file or DEFAULT")
    except (OSError, RuntimeError) as err:  # offline, or a damaged download
        fail(f"torchvision:{name}: could not load weights {pretrained!r} ({str(err).splitlines()[0]})")


def _timm_model(name: str, pretrained: str | None) -> tuple[nn.Module, tuple[float, ...] | None, tuple[float, ...] | None]:
    try:
        import timm
    except ImportError:
        fail(f"--model timm:{name} needs timm: pip install timm")
    try:
        model = timm.create_model(name, pretrained=pretrained is not None)
    except (RuntimeError, OSError, ValueError) as err:
        fail(f"timm:{name}: {str(err).splitlines()[0]}")
    config = getattr(model, "pretrained_cfg", None) or {}
    mean, std = config.get("mean"), config.get("std")
    return model, (tuple(mean) if mean else None), (tuple(std) if std else None)


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a state dict (or a checkpoint dict holding one under 'state_dict' / 'model') safely into `model`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"--weights {path}: no such file")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        fail(f"--weights {path}: not a state dict torch.load(weights_only=True) reads ({str(err).splitlines()[0]})")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        fail(f"--weights {path}: holds no state dict of tensors")
    if state and all(name.startswith("module.") for name in state):  # saved from a DistributedDataParallel wrapper
        state = {name.removeprefix("module."): value for name, value in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        fail(f"--weights {path}: does not fit the model ({' '.join(lines[1:3] or lines[:1])[:300]})")


def input_channels(model: nn.Module) -> int | None:
    """The input channels of the model's first 2-D convolution (None without one)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else int(first.in_channels)


def pool(value: object, layer: str) -> torch.Tensor:
    """A layer's output as (N, D) rows (module doc)."""
    if not isinstance(value, torch.Tensor):
        fail(f"layer {layer} gives a {type(value).__name__}, not a tensor; probe a layer that outputs one")
    if value.ndim == 4:
        return value.float().mean(dim=(2, 3))
    if value.ndim == 3:
        return value.float().mean(dim=1)
    return value.float().reshape(value.shape[0], -1)


def _graph_nodes(model: nn.Module) -> list[str] | None:
    """The eval-mode torch.fx node names of the model, or None where it does not trace."""
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        return list(get_graph_node_names(model)[1])
    except Exception:  # noqa: BLE001 - any tracing failure means: use hooks
        return None


def valid_layers(model: nn.Module) -> tuple[tuple[str, ...], bool]:
    """(every name that can be probed, in model order; whether the model traces with torch.fx)."""
    modules = [name for name, _ in model.named_modules() if name]
    nodes = _graph_nodes(model)
    if nodes is None:
        return tuple(modules), False
    known, ordered = set(modules), {}
    for node in nodes:
        if node == "x":  # the input
            continue
        parts = node.split(".")
        for depth in range(1, len(parts)):  # a module just before its first node: layer2, layer2.0, layer2.0.conv1
            prefix = ".".join(parts[:depth])
            if prefix in known:
                ordered.setdefault(prefix)
        ordered.setdefault(node)
    return tuple(dict.fromkeys([*ordered, *modules])), True


class LayerProbe(nn.Module):
    """`model` with probe points `layers` (module doc): `forward_probes(x)` → OrderedDict of (N, D) rows."""

    def __init__(self, model: nn.Module, layers: Sequence[str], *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, resize: int = 0, in_channels: int | None = None) -> None:
        super().__init__()
        names, traced = valid_layers(model)
        layers = tuple(dict.fromkeys(layers))
        if not layers:
            fail(f"name the layers to probe; this model has {', '.join(names)}")
        unknown = [name for name in layers if name not in names]
        if unknown:
            fail(f"unknown layer(s) {', '.join(unknown)}; valid names: {', '.join(names)}")
        self.probe_points = layers
        self.in_channels = input_channels(model) if in_channels is None else in_channels
        self.register_buffer("size", torch.tensor(int(resize)))
        self.register_buffer("mean", torch.tensor(tuple(mean) if mean else (), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(tuple(std) if std else (), dtype=torch.float32))
        self.traced = traced
        if traced:
            from torchvision.models.feature_extraction import create_feature_extractor

            self.body: nn.Module = create_feature_extractor(model, return_nodes={name: name for name in layers})
        else:
            self.body = model

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] NCHW images as the model takes them: channels matched, resized, normalised."""
        wanted = self.in_channels
        if wanted is not None and x.shape[1] != wanted:
            if x.shape[1] == 1:
                x = x.expand(-1, wanted, -1, -1)
            elif wanted == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                fail(f"the model takes {wanted}-channel images, the data has {x.shape[1]} channels")
        size = int(self.size)
        if size and tuple(x.shape[2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if self.mean.numel():
            channels = x.shape[1]
            if self.mean.numel() not in (1, channels):
                fail(f"input normalisation has {self.mean.numel()} channel means for {channels}-channel images")
            x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x

    def forward_probes(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.adapt(x)
        if self.traced:
            outputs = self.body(x)
        else:  # hooks live for this forward only: the wrapped model is left as it was
            outputs = {}
            modules = dict(self.body.named_modules())
            handles = [modules[name].register_forward_hook(_capture(outputs, name)) for name in self.probe_points]
            try:
                self.body(x)
            finally:
                for handle in handles:
                    handle.remove()
        return OrderedDict((name, pool(outputs[name], name)) for name in self.probe_points)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.forward_probes(x)


def _capture(outputs: dict[str, object], name: str):  # type: ignore[no-untyped-def]
    """A forward hook that stores its module's output under `name`."""
    def hook(module: nn.Module, inputs: object, output: object) -> None:
        outputs[name] = output
    return hook


def as_probe_model(model: nn.Module | str, layers: Sequence[str] | str | None, *, weights: str = "none",
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   resize: int = 0) -> tuple[nn.Module, tuple[str, ...]]:
    """(a module with `probe_points`/`forward_probes`, the layers to probe): a fastmem model as it is (its
    probe points, or the `layers` among them), anything else (or a 'torchvision:NAME' / 'timm:NAME' spec)
    wrapped in a LayerProbe. For a spec, `mean`/`std` default to the model's own (ImageNet's for
    torchvision); for a module, to none."""
    names = tuple(dict.fromkeys(n.strip() for n in (layers.split(",") if isinstance(layers, str) else (layers or ()))
                                if n.strip()))
    if isinstance(model, str):
        model, default_mean, default_std = load_model(model, weights)
        mean, std = mean if mean is not None else default_mean, std if std is not None else default_std
    if hasattr(model, "probe_points") and hasattr(model, "forward_probes"):  # a fastmem model, or a LayerProbe
        points = tuple(model.probe_points)
        unknown = [n for n in names if n not in points]
        if unknown:
            fail(f"unknown probe point(s) {', '.join(unknown)}; this model has {', '.join(points)}")
        return model, names or points
    probe = LayerProbe(model, names, mean=mean, std=std, resize=resize)
    return probe, probe.probe_points
