"""The DCGAN-style generator of the DFKD reference code, with a configurable width.

z (B, latent_dim) [+ class embedding e(y)] -> Linear -> (B, 2w, s/4, s/4) ->
upsample x2, conv -> upsample x2, conv -> conv -> sigmoid -> images in [0, 1]
of shape (B, C, s, s), where w is ``width`` (ngf) and s the image size. The
caller applies the dataset's normalisation. With ``num_classes`` the generator
is class-conditional (a learned embedding of the target class is added to the
latent, as a conditional GAN's input; NAYER conditions on label embeddings the
same way), so a batch can be asked for every class in equal measure. On a CPU
the generator dominates a step's cost: keep ``width`` at 16-32 there (the
reference scripts use 64).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedkd.models import Side, sides


class Generator(nn.Module):
    def __init__(self, *, latent_dim: int, width: int, channels: int, image_size: Side,
                 num_classes: int | None = None) -> None:
        super().__init__()
        height, image_width = sides(image_size)
        if height % 4 or image_width % 4:
            raise ValueError(f"the generator needs image sides divisible by 4, got {height}x{image_width}")
        self.latent_dim = latent_dim
        self.init_size = (height // 4, image_width // 4)
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.project = nn.Linear(latent_dim, 2 * width * self.init_size[0] * self.init_size[1])
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError("a class-conditional generator needs the target labels")
            z = z + self.embed(labels)  # (B, latent)
        out = self.project(z).view(len(z), -1, *self.init_size)  # (B, 2w, H/4, W/4)
        return self.blocks(out)  # (B, C, H, W) in [0, 1]

    def sample_latent(self, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.randn(batch_size, self.latent_dim, device=device)
