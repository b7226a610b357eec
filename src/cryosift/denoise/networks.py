"""Denoising networks: the U-Net of seed 003 (Noise2Noise / Noise2Void), fully convolutional.

Encoder: per level two 3x3 Conv-ReLU, then 2x2 max-pool; decoder: bilinear 2x upsampling, skip
connection (concatenation), two 3x3 Conv-ReLU; a final 1x1 convolution. Depth (levels) and width
(channels of the first level, doubled per level) are configurable; any box size works because
the input is reflect-padded to a multiple of 2^(depth-1) and the output cropped back.
Images are standardised per image inside `forward` (and restored after), so one model serves
stacks of any intensity scale.

A U-Net may be *conditioned* (``conditions`` > 0) on scalars known for a whole stack, each fed
as a constant input plane beside the image (as FFDNet feeds its noise level): the general model
takes the stack's estimated SNR (:func:`snr_condition`), which a single standardised crop
cannot tell it, so it can blur an SNR-0.01 stack more than an SNR-0.5 one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a U-Net denoiser (saved beside its weights)."""

    depth: int = 4
    width: int = 16
    kind: str = "unet"
    conditions: int = 0  # constant input planes (stack-level scalars such as the SNR)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        return cls(**{k: d[k] for k in ("depth", "width", "kind", "conditions") if k in d})


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net mapping (B, 1, H, W) noisy images to denoised images of the same shape."""

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        if config.depth < 2 or config.width < 1 or config.conditions < 0:
            raise ValueError(f"U-Net needs depth >= 2 and width >= 1, got {config}")
        self.config = config
        widths = [config.width * 2**i for i in range(config.depth)]
        self.down = nn.ModuleList()
        cin = 1 + config.conditions
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList(
            _block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(config.depth - 1))
        )
        self.out = nn.Conv2d(widths[0], 1, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (self.config.depth - 1)

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """Denoise (B, 1, H, W) images; ``condition``: (B, conditions) values, or one value
        (or vector) for the whole batch, for a conditioned U-Net (ignored otherwise)."""
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
        z = (x - mean) / std
        h, w = z.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            z = F.pad(z, (0, pw, 0, ph), mode="reflect")
        if self.config.conditions:
            z = torch.cat([z, self._planes(condition, z)], dim=1)
        skips = []
        for i, block in enumerate(self.down):
            z = block(z)
            if i < len(self.down) - 1:
                skips.append(z)
                z = F.max_pool2d(z, 2)
        for block in self.up:
            skip = skips.pop()
            z = F.interpolate(z, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            z = block(torch.cat([z, skip], dim=1))
        z = self.out(z)[..., :h, :w]
        return z * std + mean


    def _planes(self, condition: torch.Tensor | float | None, z: torch.Tensor) -> torch.Tensor:
        if condition is None:
            raise ValueError("this U-Net is conditioned: pass the stack's condition values")
        c = torch.as_tensor(condition, dtype=z.dtype, device=z.device).reshape(-1)
        k = self.config.conditions
        c = c.reshape(-1, k) if c.numel() != k else c.reshape(1, k)
        c = c.expand(z.shape[0], k)
        return c[:, :, None, None].expand(-1, -1, *z.shape[-2:])


def snr_condition(snr: float) -> float:
    """The general model's condition value for a stack of this SNR: log10 of it, clipped to
    [1e-3, 10] and mapped so that SNR 0.01-0.5 spans about -1 to 1."""
    s = min(max(float(snr), 1e-3), 10.0)
    return (math.log10(s) + 1.15) / 0.85


def build_network(config: dict) -> nn.Module:
    """Network from its saved architecture config."""
    kind = config.get("kind", "unet")
    if kind == "unet":
        return UNet(UNetConfig.from_dict(config))
    raise ValueError(f"unknown network kind {kind!r}")
