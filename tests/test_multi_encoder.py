"""The Multi-encoder: doubled concatenated features, a frozen adapted-encoder, checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from domgen.errors import DomgenError
from domgen.models import build_model
from domgen.models.multi_encoder import MultiEncoderModel
from domgen.preprocessing.slices import SliceSet
from domgen.models.checkpoint import load_checkpoint, save_checkpoint
from domgen.training.trainer import TrainSettings, set_train_mode, train

torch.set_num_threads(1)

# resnet18's smp out_channels are (1, 64, 64, 128, 256, 512) for one input channel; doubled by hand:
RESNET18_DOUBLED = [2, 128, 128, 256, 512, 1024]


def tiny_slices(n: int = 6, size: int = 32, seed: int = 0) -> SliceSet:
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(n, 1, size, size)).astype(np.float32)
    targets = np.zeros((n, size, size), dtype=np.uint8)
    targets[:, 10:20, 8:18] = 1
    inputs[:, 0][targets > 0] += 2.0
    truths = [t.copy() for t in targets]
    return SliceSet(inputs, targets, [f"p{i}/{i}" for i in range(n)], [f"p{i}" for i in range(n)], ["X"] * n,
                    truths, [np.ones_like(t) for t in truths], [(1.0, 1.0)] * n)


def pretrained_linknet(seed: int = 1):
    torch.manual_seed(seed)
    return build_model("linknet", "resnet18", "none", 1)


@pytest.mark.parametrize("arch", ["linknet", "unet"])
def test_decoder_receives_concatenated_features_of_doubled_width(arch):
    torch.manual_seed(0)
    model = MultiEncoderModel(arch, "resnet18").eval()
    with torch.no_grad():  # make the two encoders differ, so the order of the halves is visible
        for p in model.encoder.parameters():
            p.add_(0.01)
    seen = {}
    model.decoder.register_forward_pre_hook(lambda module, args: seen.setdefault("features", args[0]))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = model(x)
        own, adapted = model.encoder(x), model.adapted_encoder(x)
    assert out.shape == (2, 1, 32, 32)
    features = seen["features"]
    assert [f.shape[1] for f in features] == RESNET18_DOUBLED
    for f, a, b in zip(features, own, adapted):
        c = a.shape[1]
        assert torch.equal(f[:, :c], a) and torch.equal(f[:, c:], b)
    assert not torch.equal(own[-1], adapted[-1])


def test_decoder_is_built_for_the_doubled_channels():
    model = MultiEncoderModel("linknet", "resnet18")
    # Linknet's first decoder block reduces the deepest feature map: 1x1 conv from 1024 = 2 x 512 channels
    first = model.decoder.blocks[0].block[0][0]
    assert first.in_channels == 1024
    unet = MultiEncoderModel("unet", "resnet18")
    # Unet's first block takes the deepest map (1024) plus the next skip (2 x 256)
    assert unet.decoder.blocks[0].conv1[0].in_channels == 1024 + 512


def test_adapted_encoder_equals_pretrained_weights_after_training():
    pretrained = pretrained_linknet()
    expected = {k: v.clone() for k, v in pretrained.encoder.state_dict().items()}
    model = MultiEncoderModel.from_pretrained(pretrained, "linknet", "resnet18")
    assert all(not p.requires_grad for p in model.adapted_encoder.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())
    slices = tiny_slices()
    train(model, slices, slices, TrainSettings(epochs=2, batch_size=3, patience=None, augment="none"), progress=False)
    adapted = model.adapted_encoder.state_dict()
    # parameters and BatchNorm running statistics alike
    assert all(torch.equal(adapted[k], v) for k, v in expected.items())
    own = model.encoder.state_dict()
    assert any(not torch.equal(own[k], v) for k, v in expected.items() if v.is_floating_point())


def test_train_mode_keeps_the_adapted_encoder_in_eval():
    model = MultiEncoderModel("linknet", "resnet18")
    set_train_mode(model)
    assert model.encoder.training and model.decoder.training
    assert not any(m.training for m in model.adapted_encoder.modules())
    model.train()
    assert not model.adapted_encoder.training


def test_checkpoint_round_trip_rebuilds_the_multi_encoder(tmp_path):
    model = MultiEncoderModel.from_pretrained(pretrained_linknet(), "linknet", "resnet18").eval()
    # the caller's (plain) model config is overridden by the model's own
    path = save_checkpoint(tmp_path / "checkpoint.pt", model, {"arch": "linknet", "encoder": "resnet18", "encoder_weights": "none"})
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["model"]["multi_encoder"] is True
    assert isinstance(loaded, MultiEncoderModel)
    assert all(not p.requires_grad for p in loaded.adapted_encoder.parameters())
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), model(x))


def test_unsupported_architecture_is_a_user_error():
    with pytest.raises(DomgenError, match="Multi-encoder"):
        MultiEncoderModel("deeplabv3", "resnet18")
