"""The 2D U-Net of the report, with configurable depth and width."""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet2D(nn.Module):
    """U-Net: ``depth`` poolings, ``base`` channels at full resolution, doubling per level up to ``max_width``
    (0: no cap). The cap keeps a deep network's field of view (set by ``depth``) without the width of its
    coarsest levels, where most of the parameters would be.

    Input ``(N, in_channels, H, W)`` with H and W multiples of ``2**depth``; output logits
    ``(N, out_channels, H, W)``. The encoder (``encoder``, ``bottleneck``) and the decoder
    (``ups``, ``decoder``, ``head``) are separate attributes so transfer learning can freeze one.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base: int = 32, depth: int = 4, max_width: int = 0):
        super().__init__()
        widths = [min(base * 2**d, max_width) if max_width else base * 2**d for d in range(depth + 1)]
        self.depth, self.max_width = depth, max_width
        self.encoder = nn.ModuleList(
            [_block(in_channels if d == 0 else widths[d - 1], widths[d]) for d in range(depth)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(widths[depth - 1], widths[depth])
        self.ups = nn.ModuleList(
            [nn.ConvTranspose2d(widths[d + 1], widths[d], 2, stride=2) for d in reversed(range(depth))]
        )
        self.decoder = nn.ModuleList([_block(2 * widths[d], widths[d]) for d in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def architecture(self) -> dict:
        """The card's ``architecture`` entry that rebuilds this network."""
        return {
            "name": "UNet2D",
            "in_channels": self.encoder[0][0].in_channels,
            "out_channels": self.head.out_channels,
            "base": self.encoder[0][0].out_channels,
            "depth": self.depth,
            **({"max_width": self.max_width} if self.max_width else {}),  # absent when uncapped: older cards match
        }

    def encoder_parameters(self):
        """Parameters of the contracting path and bottleneck."""
        yield from self.encoder.parameters()
        yield from self.bottleneck.parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.ups, self.decoder, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class Ensemble(nn.Module):
    """Several networks with the same input and output channels run on the same slices; the output is the
    mean of their logits, for the network compute of all of them. It helps where the members make
    different mistakes (training/results/RESULTS.md measures how much it gave for the liver)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def architecture(self) -> dict:
        """The card's ``architecture`` entry: the members' entries, and the channels they share."""
        members = [m.architecture() for m in self.members]
        return {
            "name": "Ensemble",
            "in_channels": members[0]["in_channels"],
            "out_channels": members[0]["out_channels"],
            "members": members,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        for member in self.members[1:]:
            out = out + member(x)
        return out / len(self.members)
