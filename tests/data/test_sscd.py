"""SSCD descriptor model: GeM pooling, output normalisation, preprocessing, and weight loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from herd.data.curation.sscd import IMAGENET_MEAN, GeMPool2d, SSCDModel, load_sscd, sscd_transform


def test_gem_pooling_formula() -> None:
    x = torch.rand(2, 3, 4, 5)
    want = x.pow(3).mean(dim=(2, 3)).pow(1 / 3)
    torch.testing.assert_close(GeMPool2d(3.0)(x), want)
    torch.testing.assert_close(GeMPool2d(1.0)(x), F.adaptive_avg_pool2d(x, 1).flatten(1))
    # GeM lies between the mean and the max.
    g = GeMPool2d(3.0)(x)
    assert torch.all(g >= x.mean(dim=(2, 3)) - 1e-6) and torch.all(g <= x.amax(dim=(2, 3)) + 1e-6)


@pytest.fixture(scope="module")
def model() -> SSCDModel:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random weights"):
        m = load_sscd(None)
    return m


def test_random_model_shapes_and_unit_norm(model: SSCDModel) -> None:
    assert isinstance(model.backbone.avgpool, GeMPool2d)
    assert model.backbone.fc.weight.shape == (512, 2048)  # the 512-d projection
    assert not model.training
    with torch.no_grad():
        y = model(torch.randn(3, 3, 64, 48))
    assert y.shape == (3, 512)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(3))


def test_torchscript_roundtrip(model: SSCDModel, tmp_path) -> None:
    path = tmp_path / "sscd_test.torchscript.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_sscd(path)
    assert isinstance(loaded, torch.jit.ScriptModule)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_state_dict_roundtrip_and_bare_torchvision_keys(tmp_path) -> None:
    torch.manual_seed(1)
    m = SSCDModel(dims=64, trunk="resnet18").eval()  # small trunk: same loading path, faster test
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = m(x)
    torch.save(m.state_dict(), tmp_path / "full.pt")
    # SSCD's *.torchvision.pt style without our "backbone." prefix, wrapped like a training checkpoint.
    bare = {k.removeprefix("backbone."): v for k, v in m.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in bare.items()}}, tmp_path / "bare.pt")
    for name in ("full.pt", "bare.pt"):
        loaded = load_sscd(tmp_path / name)
        assert loaded.dims == 64 and loaded.trunk == "resnet18"  # read from the tensors
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), want)
    with pytest.raises(FileNotFoundError):
        load_sscd(tmp_path / "missing.pt")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="fc.weight"):
        load_sscd(tmp_path / "junk.pt")


def test_preprocessing() -> None:
    im = Image.new("RGB", (400, 200), tuple(int(round(m * 255)) for m in IMAGENET_MEAN))
    sq = sscd_transform("square")(im)
    assert sq.shape == (3, 320, 320)  # aspect ratio deliberately not kept
    assert sq.abs().max() < 0.02  # the ImageNet mean colour normalises to ~0
    short = sscd_transform("short")(im)
    assert short.shape == (3, 288, 576)  # short edge 288, aspect kept
    assert sscd_transform("square", 64)(im).shape == (3, 64, 64)
    white = sscd_transform("square", 8)(Image.new("RGB", (8, 8), (255, 255, 255)))
    np.testing.assert_allclose(
        white[:, 0, 0].numpy(), [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], rtol=1e-5
    )
    with pytest.raises(ValueError):
        sscd_transform("bogus")  # type: ignore[arg-type]
