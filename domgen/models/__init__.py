"""Models: one registry of smp architectures with the papers' hyper-parameters, and encoder weights.

Bizopoulos et al. Table I fixes the architecture hyper-parameters; Enshaei et al. use Linknet/resnet34.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import torch
from torch import nn

from domgen.errors import DomgenError

# name -> (smp class, the paper's hyper-parameters; Bizopoulos et al., Table I)
ARCHITECTURES: dict[str, tuple[type[nn.Module], dict]] = {
    "unet": (smp.Unet, {"encoder_depth": 5, "decoder_channels": (256, 128, 64, 32, 16)}),
    "linknet": (smp.Linknet, {"encoder_depth": 5}),
    "fpn": (
        smp.FPN,
        {
            "decoder_pyramid_channels": 256,
            "decoder_segmentation_channels": 128,
            "decoder_merge_policy": "add",
            "decoder_dropout": 0.2,
        },
    ),
    "pspnet": (smp.PSPNet, {"encoder_depth": 3, "psp_out_channels": 512, "psp_dropout": 0.2}),
}


def encoder_names() -> list[str]:
    return smp.encoders.get_encoder_names()


def build_model(
    arch: str = "linknet",
    encoder: str = "resnet34",
    encoder_weights: str | None = "none",
    in_channels: int = 1,
    classes: int = 1,
) -> nn.Module:
    """Build an smp model; ``encoder_weights`` is ``none``, ``imagenet`` (smp's download) or a file path."""
    if arch not in ARCHITECTURES:
        raise DomgenError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHITECTURES)}")
    if encoder not in encoder_names():
        raise DomgenError(f"unknown encoder '{encoder}'; see `domgen benchmark --dry-run` for the encoders smp offers")
    cls, params = ARCHITECTURES[arch]
    weights = (encoder_weights or "none").strip()
    smp_weights = None if weights.lower() in ("none", "random", "") or Path(weights).suffix else weights
    build = lambda: cls(encoder_name=encoder, encoder_weights=smp_weights, in_channels=in_channels, classes=classes, **params)  # noqa: E731
    try:
        if smp_weights is None:
            model = build()
        else:
            model = _with_pretrained(build, encoder, weights)
    except KeyError as exc:  # smp: no such pretrained setting for this encoder
        raise DomgenError(f"encoder '{encoder}' has no '{weights}' weights in the installed smp ({exc.args[0]})") from None
    if smp_weights is None and weights.lower() not in ("none", "random", ""):
        load_encoder_weights(model, Path(weights))
    return model


HUB_PROBE_SECONDS = 3.0


@contextlib.contextmanager
def _hub_offline():
    """huggingface_hub's offline switch for one call: files come from the local cache or not at all."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """One TCP connection to the Hugging Face endpoint (``HF_ENDPOINT``), within ``timeout`` seconds."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _with_pretrained(build, encoder: str, weights: str) -> nn.Module:
    """smp's model with downloaded encoder weights: the local cache first; the network once, only when the hub's offline
    switch is off and the hub answers a connection within seconds (smp's own retries would wait about 25 s offline)."""
    from huggingface_hub import constants

    failure = (OSError, RuntimeError, ValueError)  # huggingface_hub raises OSError subclasses offline
    try:
        with _hub_offline():
            return build()
    except failure as exc:
        cached_error = exc
    if not constants.HF_HUB_OFFLINE and hub_reachable():
        try:
            return build()
        except failure as exc:
            cached_error = exc
    raise DomgenError(
        f"could not get the {weights} weights for encoder '{encoder}' (not in the Hugging Face cache, and the hub cannot be "
        f"reached: {type(cached_error).__name__}); pass --encoder-weights none, or --encoder-weights PATH to a saved encoder "
        "state dict") from None


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Load an encoder state dict from ``path`` into ``model.encoder``.

    A 3-channel (ImageNet) first convolution is summed to the model's channel count, as smp does.
    """
    if not path.is_file():
        raise DomgenError(f"encoder weights file {path} does not exist; pass an existing state-dict file or --encoder-weights none")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt pickles/zips
        raise DomgenError(f"cannot read encoder weights {path} ({type(exc).__name__}); save it with torch.save(encoder.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DomgenError(f"encoder weights {path} is not a state dict; save it with torch.save(encoder.state_dict(), path)")
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    own = model.encoder.state_dict()
    for key, value in state.items():
        if key in own and value.ndim == 4 and own[key].ndim == 4 and value.shape[1] != own[key].shape[1]:
            if own[key].shape[1] == 1:
                state[key] = value.sum(1, keepdim=True)  # smp's patch_first_conv rule for 1 channel
    # smp encoders drop their classifier keys (fc, classifier) themselves; compare the rest by name
    ignored = ("fc.", "classifier.", "last_linear.")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(ignored)]
    if missing or unexpected:
        raise DomgenError(
            f"encoder weights {path} do not fit this encoder ({len(missing)} missing, {len(unexpected)} unexpected keys, "
            f"e.g. {(missing + unexpected)[0]}); check --encoder"
        )
    try:
        model.encoder.load_state_dict({k: v for k, v in state.items() if k in own})
    except RuntimeError as exc:
        raise DomgenError(f"encoder weights {path} do not fit this encoder ({str(exc).splitlines()[0]}); check --encoder") from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
