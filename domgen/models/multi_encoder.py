"""Wang et al.'s Multi-encoder: a trainable self-encoder beside a frozen adapted-encoder, one decoder.

Both encoders have the same smp architecture and start from the pretrained (non-COVID lesion) weights;
the adapted-encoder keeps them, the self-encoder learns the COVID target. Their features are
concatenated along channels at every level and fed to the architecture's own smp decoder, built for
the doubled encoder channels (Wang et al., Fig. 3).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from segmentation_models_pytorch.base import initialization
from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
from segmentation_models_pytorch.decoders.linknet.decoder import LinknetDecoder
from segmentation_models_pytorch.decoders.pspnet.decoder import PSPDecoder
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import nn

from domgen.errors import DomgenError
from domgen.models import ARCHITECTURES, build_model

# arch -> decoder for ``channels`` (the doubled encoder out_channels), with the registry's hyper-parameters
# and the smp model's own defaults (smp 0.6 decoders/<arch>/model.py).
DOUBLED_DECODERS: dict[str, Callable[[list[int], str, dict], nn.Module]] = {
    "unet": lambda channels, encoder, p: UnetDecoder(
        encoder_channels=channels, decoder_channels=p["decoder_channels"], n_blocks=p["encoder_depth"],
        add_center_block=encoder.startswith("vgg")),
    "linknet": lambda channels, encoder, p: LinknetDecoder(encoder_channels=channels, n_blocks=p["encoder_depth"], prefinal_channels=32),
    "fpn": lambda channels, encoder, p: FPNDecoder(
        encoder_channels=channels, encoder_depth=p.get("encoder_depth", 5), pyramid_channels=p["decoder_pyramid_channels"],
        segmentation_channels=p["decoder_segmentation_channels"], dropout=p["decoder_dropout"], merge_policy=p["decoder_merge_policy"]),
    "pspnet": lambda channels, encoder, p: PSPDecoder(encoder_channels=channels, out_channels=p["psp_out_channels"], dropout=p["psp_dropout"]),
}


class MultiEncoderModel(nn.Module):
    """``encoder`` (trainable) and ``adapted_encoder`` (frozen, always in eval mode) -> concatenated
    features -> ``decoder`` for doubled channels -> ``segmentation_head`` of the smp architecture."""

    def __init__(self, arch: str = "linknet", encoder: str = "resnet34", encoder_weights: str | None = "none",
                 in_channels: int = 1, classes: int = 1) -> None:
        super().__init__()
        if arch not in DOUBLED_DECODERS:
            supported = ", ".join(sorted(DOUBLED_DECODERS))
            raise DomgenError(f"the Multi-encoder has no doubled-channel decoder for architecture '{arch}'; use one of {supported}")
        base = build_model(arch, encoder, encoder_weights, in_channels, classes)
        self.encoder = base.encoder
        self.adapted_encoder = copy.deepcopy(base.encoder)
        self.adapted_encoder.requires_grad_(False)
        doubled = [2 * c for c in base.encoder.out_channels]
        self.decoder = DOUBLED_DECODERS[arch](doubled, encoder, ARCHITECTURES[arch][1])
        initialization.initialize_decoder(self.decoder)
        self.segmentation_head = base.segmentation_head
        # what save_checkpoint records, so load_checkpoint rebuilds this class
        self.domgen_model_config = {"arch": arch, "encoder": encoder, "encoder_weights": "none",
                                    "in_channels": in_channels, "multi_encoder": True}

    @classmethod
    def from_pretrained(cls, pretrained: nn.Module, arch: str, encoder: str, in_channels: int = 1) -> "MultiEncoderModel":
        """Both encoders take ``pretrained.encoder``'s weights; decoder and head start fresh (their shapes differ)."""
        model = cls(arch, encoder, "none", in_channels)
        state = pretrained.encoder.state_dict()
        model.encoder.load_state_dict(state)
        model.adapted_encoder.load_state_dict(state)
        return model

    def train(self, mode: bool = True) -> "MultiEncoderModel":
        super().train(mode)
        self.adapted_encoder.eval()  # its BatchNorm statistics are part of the pretrained weights
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Self-encoder and adapted-encoder features, concatenated along channels level by level."""
        own = self.encoder(x)
        with torch.no_grad():
            adapted = self.adapted_encoder(x)
        return [torch.cat([a, b], dim=1) for a, b in zip(own, adapted)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(self.features(x)))
