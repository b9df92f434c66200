"""Cheap augmentation of synthetic images: small random translations and affine warps, never flips.

Integer shifts with nearest-neighbour sampling keep every pixel value as it
was (a quantised image stays quantised) and let gradients through, so the
same function serves inside synthesis (the teachers see the shifted image, as
Fast-Datafree and NAYER crop inside synthesis) and over the pool. Horizontal
flips, which the CIFAR recipes add, would turn digits into other symbols.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image of (B, C, H, W) by its own integer offset in [-max_shift, max_shift]; zeros enter."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    offsets = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator).to(images.device)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2.0 * offsets[:, 0].to(images.dtype) / w  # align_corners=False: one pixel is 2 / size
    theta[:, 1, 2] = -2.0 * offsets[:, 1].to(images.dtype) / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def random_affine(images: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Warp each image of (B, C, H, W) by its own random affine map: rotated by up to ``strength`` degrees,
    scaled by a factor within 1 +- strength / 100, moved by up to strength / 200 of its width and height;
    bilinear, zeros enter (torchvision's ``RandomAffine`` draws one map per call, this one per image)."""
    if strength <= 0:
        return images
    b = images.shape[0]
    u = torch.rand(b, 4, generator=generator).to(images.device, images.dtype) * 2 - 1
    angle = u[:, 0] * strength * torch.pi / 180
    scale = 1 + u[:, 1] * strength / 100
    move = u[:, 2:] * strength / 100  # in grid units (2 = the whole image): strength / 200 of it
    # the grid maps each output pixel to where it samples the input: the inverse map, in = A (out - move)
    a = torch.stack([torch.stack([torch.cos(angle), -torch.sin(angle)], 1),
                     torch.stack([torch.sin(angle), torch.cos(angle)], 1)], 1) / scale.view(b, 1, 1)
    theta = torch.cat([a, -(a @ move.unsqueeze(2))], 2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
