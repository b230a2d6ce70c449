"""The standard 3D U-Net (Çiçek et al.; Müller et al.'s MIScnn 'Standard' architecture).

Depth 4 (five levels, 32 -> 512 filters in the paper), two 3x3x3 convolutions + batch norm + ReLU per
level, max-pooling down, transposed convolutions up, skips concatenated. The encoder and decoder are
separate modules, so transfer learning can pretrain, freeze or swap the encoder as in 2D.
"""
from __future__ import annotations

import torch
from torch import nn

from domgen.errors import DomgenError
from domgen.settings import CV, default


class ConvBlock3d(nn.Sequential):
    """Two (3x3x3 conv, batch norm, ReLU)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True),
        )


class UNet3dEncoder(nn.Module):
    """Contracting path: returns the feature map of every level, finest first (the skips and the bottleneck)."""

    def __init__(self, in_channels: int = 1, features: tuple[int, ...] = (32, 64, 128, 256, 512)) -> None:
        super().__init__()
        self.features = tuple(int(f) for f in features)
        self.levels = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(self.features):
            block = ConvBlock3d(previous, width)
            self.levels.append(block if level == 0 else nn.Sequential(nn.MaxPool3d(2), block))
            previous = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for level in self.levels:
            x = level(x)
            out.append(x)
        return out


class UNet3dDecoder(nn.Module):
    """Expanding path: transposed convolution up, concatenate the skip, two convolutions; 1x1x1 head."""

    def __init__(self, features: tuple[int, ...] = (32, 64, 128, 256, 512), classes: int = 3,
                 skip_features: tuple[int, ...] | None = None) -> None:
        super().__init__()
        skips = tuple(skip_features or features)
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        below = skips[-1]
        for level in range(len(features) - 2, -1, -1):
            self.up.append(nn.ConvTranspose3d(below, features[level], 2, stride=2))
            self.blocks.append(ConvBlock3d(features[level] + skips[level], features[level]))
            below = features[level]
        self.head = nn.Conv3d(features[0], classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        x = levels[-1]
        for up, block, skip in zip(self.up, self.blocks, reversed(levels[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class UNet3d(nn.Module):
    """Input sides must be multiples of 2**depth (16 for depth 4): the patch sizes and sliding windows are."""

    def __init__(self, in_channels: int = 1, classes: int = 3, features: tuple[int, ...] = (32, 64, 128, 256, 512)) -> None:
        super().__init__()
        self.encoder = UNet3dEncoder(in_channels, features)
        self.decoder = UNet3dDecoder(tuple(features), classes)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.encoder.features) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))



class MultiEncoderUNet3d(nn.Module):
    """Wang et al.'s Multi-encoder on the 3D U-Net: ``encoder`` (trainable) and ``adapted_encoder`` (frozen, always
    in eval mode), both copies of a pretrained encoder, their features concatenated at every level into one
    decoder built for the doubled channels (the 3D counterpart of ``domgen.models.multi_encoder``)."""

    def __init__(self, in_channels: int = 1, classes: int = 3, features: tuple[int, ...] = (32, 64, 128, 256, 512)) -> None:
        super().__init__()
        self.encoder = UNet3dEncoder(in_channels, features)
        self.adapted_encoder = UNet3dEncoder(in_channels, features)
        self.adapted_encoder.requires_grad_(False)
        self.decoder = UNet3dDecoder(tuple(features), classes, skip_features=tuple(2 * f for f in features))

    @classmethod
    def from_pretrained(cls, pretrained: UNet3d, classes: int = 3) -> "MultiEncoderUNet3d":
        features = pretrained.encoder.features
        in_channels = pretrained.encoder.levels[0][0].in_channels
        model = cls(in_channels, classes, features)
        model.encoder.load_state_dict(pretrained.encoder.state_dict())
        model.adapted_encoder.load_state_dict(pretrained.encoder.state_dict())
        model.domgen_model_config = {"arch": "unet3d", "features": list(features), "in_channels": in_channels, "classes": classes,
                                     "dims": 3, "multi_encoder": True}
        return model

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.encoder.features) - 1)

    def train(self, mode: bool = True) -> "MultiEncoderUNet3d":
        super().train(mode)
        self.adapted_encoder.eval()  # its BatchNorm statistics are part of the pretrained weights
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        own, adapted = self.encoder(x), self.adapted_encoder(x)
        return self.decoder([torch.cat([a, b], dim=1) for a, b in zip(own, adapted)])

ARCHITECTURES_3D = {"unet3d": UNet3d}


def build_model_3d(cfg: dict) -> nn.Module:
    """A 3D model from the profile's ``model`` section: {arch: unet3d, features: [...], in_channels, classes}."""
    arch = str(cfg.get("arch", default(CV, "model.arch")))
    if arch not in ARCHITECTURES_3D:
        raise DomgenError(f"model.arch {arch!r} is not a 3D architecture; choose one of {', '.join(ARCHITECTURES_3D)}")
    features = cfg.get("features", default(CV, "model.features"))
    if not isinstance(features, (list, tuple)) or len(features) < 2 or not all(isinstance(f, int) and f > 0 for f in features):
        raise DomgenError(f"model.features {features!r} must be a list of at least two positive filter counts, e.g. [32, 64, 128, 256, 512]")
    model = ARCHITECTURES_3D[arch](int(cfg.get("in_channels", default(CV, "model.in_channels"))),
                                   int(cfg.get("classes", default(CV, "model.classes"))), tuple(features))
    model.domgen_model_config = {"arch": arch, "features": list(features), "in_channels": int(cfg.get("in_channels", 1)),
                                 "classes": int(cfg.get("classes", 3)), "dims": 3}
    return model
