"""The open-set teacher recipe (``teacher-recipe=open-set``): a teacher that can say "not mine".

Under label skew every closed-set teacher answers every input confidently, including inputs of classes it never
saw, and no rule for combining them can tell which teacher knows *this* input (issue 28's probe: every averaging
rule stalls near 0.69 on a pathological split). FedOV (Diao et al., ICLR 2023; ``Xtra-Computing/FedOV``,
``experiments.py`` ``train_net_vote``) trains each client's model with one extra output, "unknown", learned from
the client's own images made unrecognisable, and then trusts, per input, the teachers least likely to say unknown.
This module is that recipe, on the client side only: the teacher has ``C + 1`` outputs (the last is "unknown"),
and its loss is

    CE(f(x), y)                         its own data, as before (label smoothing as configured)
  + CE(f(corrupt(x)), unknown)          its own images corrupted: a small crop blown up, a heavy blur, a large
                                        erased patch, half-image swaps, rotated half-strips (FedOV's ``aug_crop``)
  + CE(f(x) - 1e4 onehot(y), unknown)   on its own data "unknown" is the runner-up (FedOV's ``out_second``)
  + CE(f(harden(corrupt(x))), unknown)  the corrupted images one sign step harder to call unknown (FedOV's
                                        FastGradientSignUntargeted, here one step of the size of its five)

FedOV also mixes penultimate embeddings of different classes (weight 0.01); that needs a model split at its
features, which institutions' own models do not offer, so fedkd leaves it out.

The coordinator learns from the description (``unknown_output``) that a teacher's answers carry the extra output
and weighs each answer by 1 - p(unknown) (``fedkd.coordinator.aggregation``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.imports import load_heavy

load_heavy("torchvision")  # first, under the lock that keeps two threads from importing torch.distributed at once
from torchvision.transforms.v2 import functional as TF  # noqa: E402

RECIPES = ("closed", "open-set")
HARDENING_STEP = 0.01  # pixels in [0, 1]: FedOV's five steps of 0.002, as one
UNKNOWN_MARGIN = 1e4  # what masks the true class out of the runner-up loss


def _crop(x: Tensor, rng: torch.Generator) -> Tensor:
    """A crop of 10-33 % of the area, resized back to the whole image (FedOV: RandomResizedCrop(scale=(0.1, 0.33)))."""
    h, w = x.shape[-2:]
    area = float(torch.empty(()).uniform_(0.10, 0.33, generator=rng)) * h * w
    ratio = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3), generator=rng)))
    ch = max(1, min(h, round(math.sqrt(area / ratio))))
    cw = max(1, min(w, round(math.sqrt(area * ratio))))
    top = int(torch.randint(0, h - ch + 1, (), generator=rng))
    left = int(torch.randint(0, w - cw + 1, (), generator=rng))
    return F.interpolate(x[..., top:top + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False)


def _blur(x: Tensor, rng: torch.Generator) -> Tensor:
    """A heavy blur, long along one axis (FedOV: GaussianBlur of kernel (3-9) x (1-5), sigma 10-100)."""
    long = 2 * int(torch.randint(1, 5, (), generator=rng)) + 1
    short = 2 * int(torch.randint(0, 3, (), generator=rng)) + 1
    size = [long, short] if int(torch.randint(0, 2, (), generator=rng)) else [short, long]
    sigma = float(torch.empty(()).uniform_(10.0, 100.0, generator=rng))
    return TF.gaussian_blur(x, kernel_size=size, sigma=[sigma, sigma])


def _erase(x: Tensor, rng: torch.Generator) -> Tensor:
    """A patch of 33-50 % of the area set to the mean (FedOV: RandomErasing(scale=(0.33, 0.5)))."""
    h, w = x.shape[-2:]
    area = float(torch.empty(()).uniform_(0.33, 0.5, generator=rng)) * h * w
    eh = max(1, min(h, round(math.sqrt(area))))
    ew = max(1, min(w, round(area / eh)))
    top = int(torch.randint(0, h - eh + 1, (), generator=rng))
    left = int(torch.randint(0, w - ew + 1, (), generator=rng))
    return TF.erase(x, top, left, eh, ew, torch.zeros((), device=x.device), inplace=False)


def _cut(x: Tensor, rng: torch.Generator) -> Tensor:
    """Half the image copied over another place, or the two halves swapped (FedOV's ``cut``)."""
    out = x.clone()
    dim = -1 if int(torch.randint(0, 2, (), generator=rng)) else -2
    n = x.shape[dim]
    half = n // 2
    if int(torch.randint(0, 3, (), generator=rng)) == 0:  # swap the halves
        return torch.cat([x.narrow(dim, half, n - half), x.narrow(dim, 0, half)], dim)
    places = n - half + 1
    src = int(torch.randint(0, places, (), generator=rng))
    away = [p for p in range(places) if abs(p - src) >= max(1, half // 2)]
    if not away:  # an image too small to move a half by a quarter: swap instead
        return torch.cat([x.narrow(dim, half, n - half), x.narrow(dim, 0, half)], dim)
    dst = away[int(torch.randint(0, len(away), (), generator=rng))]
    out.narrow(dim, dst, half).copy_(x.narrow(dim, src, half))
    return out


def _rotate(x: Tensor, rng: torch.Generator) -> Tensor:
    """The two half-squares of a horizontal strip each rotated by 90, 180 or 270 degrees (FedOV's ``rot``)."""
    h, w = x.shape[-2:]
    half = min(h, w) // 2
    if half < 1:
        return x.flip(-1)
    out = x.clone()
    top = int(torch.randint(0, h - half + 1, (), generator=rng))
    k = int(torch.randint(1, 4, (), generator=rng))
    for left in (0, w - half):
        out[..., top:top + half, left:left + half] = torch.rot90(x[..., top:top + half, left:left + half], k, (-2, -1))
    return out


CORRUPTIONS = (_crop, _blur, _erase, _cut, _rotate, _cut, _rotate)  # FedOV's choice, cut and rot twice as likely


def corrupt(x: Tensor, rng: torch.Generator) -> Tensor:
    """Each image of the (B, C, H, W) batch made unrecognisable by one corruption drawn at random (the images that
    draw the same corruption share its parameters)."""
    pick = torch.randint(0, len(CORRUPTIONS), (len(x),), generator=rng)
    out = torch.empty_like(x)
    for i, fn in enumerate(CORRUPTIONS):
        rows = (pick == i).nonzero().flatten()
        if len(rows):
            out[rows] = fn(x[rows], rng)
    return out


@contextmanager
def running_statistics_kept(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the batch as usual inside, but their running statistics come out as they
    went in: they describe the teacher's own images only, not the outliers it learns to call unknown (the
    coordinator's synthesis matches them, ``fedkd.institution.terms``)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # momentum 0 keeps each running statistic as it is (an in-place restore afterwards would break the backward
    # pass, which saved those buffers); the count of batches is put back
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(layers, saved):
            m.momentum = momentum
            if tracked is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def open_set_loss(model: nn.Module, x: Tensor, y: Tensor, rng: torch.Generator, *, num_classes: int,
                  label_smoothing: float, hardening_step: float) -> Tensor:
    """The recipe's loss on one batch of normalised inputs ``x`` with labels ``y`` (the module docstring);
    ``hardening_step`` in the inputs' (normalised) units."""
    unknown = torch.full_like(y, num_classes)
    out = model(x)
    if out.shape[-1] != num_classes + 1:
        raise ValueError(f"an open-set teacher needs {num_classes + 1} outputs (the classes and 'unknown'), the "
                         f"model gives {out.shape[-1]}")
    loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
    masked = out - UNKNOWN_MARGIN * F.one_hot(y, num_classes + 1).to(out.dtype)
    loss = loss + F.cross_entropy(masked, unknown)
    outliers = corrupt(x.detach(), rng)
    with running_statistics_kept(model):
        loss = loss + F.cross_entropy(model(outliers), unknown)
        if hardening_step > 0:
            probe = outliers.clone().requires_grad_(True)
            grad, = torch.autograd.grad(F.cross_entropy(model(probe), unknown), probe)
            hardened = (outliers + hardening_step * grad.sign()).detach()
            loss = loss + F.cross_entropy(model(hardened), unknown)
    return loss
