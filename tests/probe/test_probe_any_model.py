"""The probe of any model on any data: `python -m fastmem.probe --model torchvision:NAME --dataset ...` and
`fastmem.probe.probe_model` (fastmem/probe/any_model.py, images.py, library.py)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import run_module

from fastmem.data.synthetic import make_synthetic
from fastmem.errors import FastmemError
from fastmem.models import create_model
from fastmem.probe import probe_knn, probe_model
from fastmem.probe.any_model import IMAGENET_MEAN, IMAGENET_STD, LayerProbe, as_probe_model, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CELL = r"\d+\.\d\d% \[\s*\d+\.\d\d,\s*\d+\.\d\d\]"  # a value with its 95 % Wilson interval


def _fmnist_available() -> bool:
    from fastmem.data import load_dataset

    try:
        load_dataset("fashion-mnist", "test")
    except FastmemError:
        return False
    return True


@pytest.mark.skipif(not _fmnist_available(), reason="Fashion-MNIST is not installed here")
def test_torchvision_cli_prints_both_metrics_per_layer(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = run_module("fastmem.probe", "--model", "torchvision:resnet18", "--weights", "none", "--dataset",
                        "fashion-mnist", "--subset", "500", "--probe-subset", "200", "--layers", "layer2,layer4",
                        "--metrics", "knn,linear", "--device", "cpu", "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "500 references" in lines[0] and "200 test queries" in lines[0]
    assert lines[1].split() == ["layer", "knn@20", "linear"]
    for layer in ("layer2", "layer4"):
        (row,) = [line for line in lines if line.startswith(layer + " ")]
        assert len(re.findall(CELL, row)) == 2, row
    assert out.with_suffix(".json").exists() and out.with_suffix(".csv").exists()
    assert np.load(out.with_suffix(".npz"))["layer4/linear"].shape == (200,)


def test_unknown_layer_is_one_line_listing_the_valid_names() -> None:
    result = run_module("fastmem.probe", "--model", "torchvision:resnet18", "--dataset", "synthetic",
                        "--layers", "layer2,layer9", "--device", "cpu")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("fastmem: error: unknown layer(s) layer9; valid names: conv1, bn1, relu, maxpool, layer1,")
    assert ", layer4.1.relu_1," in line and line.endswith(", fc")


def test_mode_flags_and_missing_timm_are_one_line(tmp_path: Path) -> None:
    from fastmem.probe.__main__ import main

    for argv, message in [([], "give a RUN_DIR, or --model"),
                          ([str(tmp_path), "--model", "torchvision:resnet18"], "not both"),
                          ([str(tmp_path), "--subset", "10"], "--subset applies to --model only"),
                          (["--model", "torchvision:resnet18", "--untrained", "--dataset", "synthetic"],
                           "--untrained applies to a RUN_DIR only"),
                          (["--model", "torchvision:resnet18", "--layers", "fc"], "--model needs --dataset"),
                          (["--model", "resnet18", "--dataset", "synthetic"], "use torchvision:NAME or timm:NAME"),
                          (["--model", "torchvision:resnet1800", "--dataset", "synthetic"], "unknown torchvision model")]:
        with pytest.raises(FastmemError, match=re.escape(message)) as err:
            main(argv)
        assert "\n" not in str(err.value)
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(FastmemError, match=r"^--model timm:resnet18 needs timm: pip install timm$"):
            load_model("timm:resnet18")


def _data(size: int = 16):
    return make_synthetic(120, size=size, seed=0), make_synthetic(40, size=size, seed=0, split="test")


def test_weights_file_loads_with_weights_only_and_equals_the_module(tmp_path: Path) -> None:
    train, test = _data()
    torch.manual_seed(3)
    model = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    options = dict(metrics=("knn",), k=(5,), device="cpu")
    from_file = probe_model("torchvision:resnet18", "layer3", train.images, train.labels, test.images, test.labels,
                            weights=str(path), **options)
    from_module = probe_model(model, "layer3", train.images, train.labels, test.images, test.labels,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD, **options)
    assert np.array_equal(from_file.value("layer3", "knn@5").predictions, from_module.value("layer3", "knn@5").predictions)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "other.pt")
    for name, message in [("garbage.pt", "not a state dict"), ("other.pt", "does not fit the model")]:
        with pytest.raises(FastmemError, match=message) as err:
            load_model("torchvision:resnet18", str(tmp_path / name))
        assert "\n" not in str(err.value)


class _Branchy(torch.nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so its layers are probed through forward hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 6, 3)
        self.body = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(6, 10, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.sum() > 0:
            x = x * 1.0
        return self.body(x).mean(dim=(2, 3))


def test_untraceable_models_use_hooks_and_pool_maps_by_their_mean() -> None:
    torch.manual_seed(0)
    model = _Branchy().eval()
    probe, layers = as_probe_model(model, "stem,body.1", mean=None, std=None)
    assert isinstance(probe, LayerProbe) and not probe.traced and layers == ("stem", "body.1")
    x = torch.rand(4, 1, 12, 12)  # one channel: repeated to the three the first convolution takes
    with torch.no_grad():
        got = probe.forward_probes(x)
        stem = model.stem(x.expand(-1, 3, -1, -1))
        expected = {"stem": stem.mean(dim=(2, 3)), "body.1": model.body(stem).mean(dim=(2, 3))}
    for name in layers:
        torch.testing.assert_close(got[name], expected[name])
    assert not model.stem._forward_hooks  # the hooks lived for that forward only
    with pytest.raises(FastmemError, match="unknown layer.*valid names: stem, body, body.0, body.1"):
        as_probe_model(model, "head")


def test_a_dataset_equals_its_arrays_and_a_fastmem_model_equals_its_probe() -> None:
    train, test = _data()

    class Items(torch.utils.data.Dataset):
        """(CHW float tensor in [0, 1], label) items, as torchvision's ToTensor gives."""

        def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
            self.images, self.labels = images, labels

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int):
            return torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 255, int(self.labels[i])

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=3, image_size=16, width=0.25, bottleneck_dim=64)
    arrays = probe_model(model, ["stage2", "z"], train.images, train.labels, test.images, test.labels, k=(5, 20))
    dataset = probe_model(model, ["stage2", "z"], Items(train.images, train.labels), None,
                          Items(test.images, test.labels), None, k=(5, 20))
    old = probe_knn(model, train.images, train.labels, test.images, test.labels, device=torch.device("cpu"), k=20,
                    layers=("stage2", "z"))
    for layer in ("stage2", "z"):
        for column in ("knn@5", "knn@20"):
            assert np.array_equal(arrays.value(layer, column).predictions, dataset.value(layer, column).predictions)
        assert arrays.value(layer, "knn@20").value == pytest.approx(old[layer])
    normalised = [(torch.zeros(3, 16, 16) - 0.5, 0)]
    with pytest.raises(FastmemError, match=r"must lie in \[0, 1\].*drop Normalize"):
        probe_model(model, ["z"], normalised, None, normalised, None)
