"""Model zoo: teachers and students, built by name for a dataset's input shape.

``build_model("resnet18", num_classes=10, channels=3, image_size=32)``. Names:
lenet5, lenet5-half (the DAFL/RDSKD MNIST pair, with BatchNorm so that the
teacher carries feature statistics), cnn (a small two-layer CNN), resnet18 and
resnet34 (CIFAR-style), and wrn-D-W (wide ResNet of depth D and width W, for
example wrn-16-2, wrn-40-2).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.imports import load_heavy

Side = int | tuple[int, ...]  # one side of a square image, or (height, width)


def sides(image_size: Side) -> tuple[int, int]:
    """(height, width) of an image size given as one side or as (height, width)."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


class LeNet5(nn.Module):
    """LeNet-5 with BatchNorm; ``width`` 0.5 gives LeNet-5-half."""

    def __init__(self, num_classes: int, channels: int, image_size: Side, width: float = 1.0) -> None:
        super().__init__()
        c1, c2 = int(6 * width), int(16 * width)
        f1, f2 = int(120 * width), int(84 * width)
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, 5, padding=2), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        )
        height, image_width = sides(image_size)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * (height // 4) * (image_width // 4), f1), nn.ReLU(), nn.Linear(f1, f2),
            nn.ReLU(), nn.Linear(f2, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """Two conv blocks (32, 64 channels) with BatchNorm and a 128-unit head."""

    def __init__(self, num_classes: int, channels: int, image_size: Side) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        height, width = sides(image_size)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * (height // 4) * (width // 4), 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (3x3 stem, no max-pool), as in the DFKD reference code."""

    def __init__(self, blocks: list[int], num_classes: int, channels: int) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layers = nn.Sequential(*[
            self._make_layer(planes, n, stride)
            for planes, n, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2))
        ])
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(_BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class _WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko and Komodakis), pre-activation blocks."""

    def __init__(self, depth: int, width: int, num_classes: int, channels: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or not 10 <= depth <= 1000:
            raise ValueError(f"wide ResNet depth must be 6n+4 between 10 and 1000 (16, 22, 28, 40...), got {depth}")
        if not 1 <= width <= 64:
            raise ValueError(f"wide ResNet width must be between 1 and 64, got {width}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(_WideBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


_Builder = Callable[[int, int, Side], nn.Module]

MODELS: dict[str, _Builder] = {
    "lenet5": lambda c, ch, s: LeNet5(c, ch, s),
    "lenet5-half": lambda c, ch, s: LeNet5(c, ch, s, width=0.5),
    "cnn": lambda c, ch, s: SmallCNN(c, ch, s),
    "resnet18": lambda c, ch, s: ResNet([2, 2, 2, 2], c, ch),
    "resnet34": lambda c, ch, s: ResNet([3, 4, 6, 3], c, ch),
}
_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")


def model_names() -> list[str]:
    return [*MODELS, "wrn-D-W (e.g. wrn-16-2, wrn-40-2)"]


def is_model_name(name: str) -> bool:
    return name in MODELS or bool(_WRN.match(name))


TORCHVISION = "torchvision:"
_CALLABLE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def is_code_spec(spec: str) -> bool:
    """``PACKAGE.MODULE:CALLABLE``: a model built by the user's own code (imported when it is built)."""
    return not spec.startswith(TORCHVISION) and bool(_CALLABLE.match(spec))


def is_student_spec(spec: str) -> bool:
    """A student fedkd can build: a registry name, ``torchvision:NAME`` (a classifier of torchvision.models) or
    ``PACKAGE.MODULE:CALLABLE`` (the user's own code)."""
    return is_model_name(spec) or spec.startswith(TORCHVISION) or is_code_spec(spec)


def code_classifier(spec: str, args: dict[str, Any]) -> nn.Module:
    """``PACKAGE.MODULE:CALLABLE`` called with ``args``: the user's own model code (a class or a factory; timm's
    and Hugging Face's work too). ValueError naming the spec: a module that does not import, a callable that
    is missing, arguments it refuses, a result that is not an ``nn.Module``."""
    import importlib

    module_name, _, attribute = spec.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{spec!r}: module {module_name!r} does not import ({exc}); is it on PYTHONPATH?") from None
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise ValueError(f"{spec!r}: module {module_name!r} has no callable {attribute!r}")
    try:
        model = factory(**args)
    except TypeError as exc:
        raise ValueError(f"{spec!r} with arguments {args}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r}: {attribute}(...) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def torchvision_classifier(name: str, args: dict[str, Any]) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, **args)``, for a classification model only;
    ValueError naming what is wrong (nothing is downloaded)."""
    load_heavy("torchvision")
    import torchvision

    classifiers = torchvision.models.list_models(module=torchvision.models)
    if name not in classifiers:
        close = [n for n in classifiers if name.lower() in n]
        raise ValueError(f"torchvision:{name} is not a classification model of torchvision.models"
                         + (f"; did you mean {', '.join(close[:5])}?" if close else ""))
    args = dict(args)
    if args.pop("weights", None) not in (None, "None"):
        raise ValueError(f"torchvision:{name}: pretrained weights would download; give your weights as a state dict")
    try:
        return torchvision.models.get_model(name, weights=None, **args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"torchvision:{name} with arguments {args}: {exc}") from None


def build_classifier(spec: str, *, num_classes: int, channels: int, image_size: Side,
                     args: dict[str, Any] | None = None) -> nn.Module:
    """The classifier a spec names (a student, or a teacher fedkd trains), for the task's classes (a torchvision
    model gets ``num_classes`` unless ``args`` say otherwise; the user's own callable gets ``args`` only: its
    output is checked against the task where it is built)."""
    if spec.startswith(TORCHVISION):
        return torchvision_classifier(spec[len(TORCHVISION):], {"num_classes": num_classes, **(args or {})})
    if is_code_spec(spec):
        return code_classifier(spec, dict(args or {}))
    if args:
        raise ValueError(f"student-args: fedkd's own model {spec!r} takes none")
    return build_model(spec, num_classes=num_classes, channels=channels, image_size=image_size)


def build_model(name: str, *, num_classes: int, channels: int, image_size: Side) -> nn.Module:
    """Build a model by name; unknown names fail with the list of valid ones."""
    if name in MODELS:
        if name.startswith(("lenet5", "cnn")) and min(sides(image_size)) < 4:
            height, width = sides(image_size)
            raise ValueError(f"model {name!r} needs images of at least 4x4, got {height}x{width}")
        return MODELS[name](num_classes, channels, image_size)
    match = _WRN.match(name)
    if match:
        return WideResNet(int(match.group(1)), int(match.group(2)), num_classes, channels)
    raise KeyError(f"unknown model {name!r}; valid names: {', '.join(model_names())}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def average_weights(models: list[nn.Module]) -> dict[str, Tensor]:
    """One-shot FedAvg: the element-wise mean of same-architecture state dicts (buffers included)."""
    states = [m.state_dict() for m in models]
    keys = states[0].keys()
    if any(s.keys() != keys for s in states):
        raise ValueError("FedAvg needs teachers of one architecture")
    out = {}
    for k in keys:
        stacked = torch.stack([s[k].float() for s in states])
        out[k] = stacked.mean(0).to(states[0][k].dtype)
    return out
