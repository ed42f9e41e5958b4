"""SSCD copy-detection descriptor (Pizzi et al., 2022), the model the paper uses for image dedup (§7.1).

Architecture (matches SSCD's torchvision variant so its state dicts load key for key): a torchvision
ResNet-50 trunk whose global average pool is replaced by GeM pooling (p=3), its `fc` layer acting as
the 2048→512 projection, then L2 normalisation. Descriptors of copies have high cosine similarity;
SSCD's authors quote cos > 0.75 as 90%-precision copies on DISC for `sscd_disc_mixup`.

Weights are never downloaded: `load_sscd(path)` takes the official TorchScript files
(`sscd_disc_mixup.torchscript.pt`, …), SSCD's `*.torchvision.pt` state dicts, or a state dict of
`SSCDModel`. `load_sscd(None)` builds a random model and warns (tests only).
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet statistics: SSCD's published preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ResizeMode = Literal["square", "short"]


class GeMPool2d(nn.Module):
    """Generalised-mean pooling: (mean over H·W of x^p)^(1/p); p=1 is average, p→∞ is max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, C, H, W), non-negative after ReLU; clamp keeps pow() differentiable and finite.
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)  # (N, C)


TRUNKS = ("resnet50", "resnet18", "resnext101_32x8d")  # SSCD's torchvision backbones (TV_*)


class SSCDModel(nn.Module):
    """ResNet trunk + GeM + linear projection + L2 norm. Input (N, 3, H, W) normalised RGB → (N, dims).

    The default trunk is ResNet-50 (sscd_disc_mixup and friends); ResNet-18 / ResNeXt-101 are SSCD's
    other torchvision backbones.
    """

    def __init__(self, dims: int = 512, pool_p: float = 3.0, trunk: str = "resnet50"):
        super().__init__()
        import torchvision.models as tvm

        if trunk not in TRUNKS:
            raise ValueError(f"unknown trunk {trunk!r}; one of {TRUNKS}")
        # `backbone.fc` is the (2048 or 512)→dims projection; this naming is what SSCD's checkpoints use.
        self.backbone = getattr(tvm, trunk)(num_classes=dims, zero_init_residual=True)
        self.backbone.avgpool = GeMPool2d(pool_p)
        self.dims = dims
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=-1)  # (N, dims), unit L2 norm


def _infer_trunk(state: dict[str, torch.Tensor]) -> str:
    """Which torchvision trunk a state dict belongs to, from its block structure."""
    if "backbone.layer1.0.conv3.weight" not in state:
        return "resnet18"  # basic blocks
    conv2 = state["backbone.layer1.0.conv2.weight"]  # (out, in/groups, 3, 3)
    return "resnext101_32x8d" if conv2.shape[1] != conv2.shape[0] else "resnet50"


def _is_torchscript(path: Path) -> bool:
    # TorchScript archives carry serialized code; plain torch.save archives do not.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _clean_state_dict(state: dict) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")  # DDP-wrapped checkpoints
        if not k.startswith("backbone."):
            k = "backbone." + k  # a bare torchvision ResNet state dict
        out[k] = v
    return out


def load_sscd(
    weights: str | Path | None,
    *,
    dims: int = 512,
    pool_p: float = 3.0,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Return an eval-mode SSCD descriptor model.

    `weights` is a TorchScript file (loaded with `torch.jit.load`, any trunk), a state dict of
    `SSCDModel` / SSCD's torchvision checkpoint (trunk and projection size read from the tensors), or None for
    random weights (explicit, with a warning: such descriptors do not detect copies).
    SSCD's `*.classy.pt` (Classy Vision trunk) state dicts are not supported: use the torchscript or
    torchvision file of the same model.
    """
    if weights is None:
        warnings.warn(
            "SSCD with random weights: descriptors are meaningless for copy detection (tests only). "
            "Pass --weights sscd_disc_mixup.torchscript.pt or bring descriptors with --embeddings.",
            stacklevel=2,
        )
        model: nn.Module = SSCDModel(dims, pool_p)
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"SSCD weights not found: {path}")
        if _is_torchscript(path):
            model = torch.jit.load(str(path), map_location="cpu")
        else:
            state = _clean_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            fc = state.get("backbone.fc.weight")
            if fc is None:
                raise ValueError(f"{path}: not an SSCD/torchvision ResNet state dict (no fc.weight)")
            model = SSCDModel(int(fc.shape[0]), pool_p, trunk=_infer_trunk(state))
            model.load_state_dict(state, strict=True)
    return model.eval().to(device)


def sscd_transform(mode: ResizeMode = "square", size: int | None = None):
    """SSCD's inference preprocessing for PIL images.

    "square": resize to size×size (default 320) ignoring aspect ratio — SSCD's recommendation for
    batched inference, every tensor has the same shape. "short": resize the short edge to `size`
    (default 288) keeping aspect ratio; batches then group images of equal shape.
    """
    from torchvision import transforms as T

    if mode == "square":
        s = size or 320
        resize = T.Resize([s, s])
    elif mode == "short":
        resize = T.Resize(size or 288)
    else:
        raise ValueError(f"unknown resize mode {mode!r} (square|short)")
    return T.Compose([resize, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
