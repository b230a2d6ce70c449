"""Model registry and encoder weights loaded from files the tests write."""
import pytest
import segmentation_models_pytorch as smp
import torch

from domgen.errors import DomgenError
from domgen.models import ARCHITECTURES, build_model, count_parameters


def test_encoder_weights_from_a_saved_state_dict(tmp_path):
    donor = smp.Linknet("resnet18", encoder_weights=None, in_channels=1)
    path = tmp_path / "encoder.pt"
    torch.save(donor.encoder.state_dict(), path)
    model = build_model("linknet", "resnet18", str(path))
    for (k, a), b in zip(donor.encoder.state_dict().items(), model.encoder.state_dict().values()):
        assert torch.equal(a, b), k


def test_three_channel_imagenet_shaped_weights_are_summed_to_one_channel(tmp_path):
    rgb = smp.encoders.get_encoder("resnet18", in_channels=3, weights=None)
    path = tmp_path / "rgb.pth"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in rgb.state_dict().items()}}, path)
    model = build_model("unet", "resnet18", str(path))
    assert torch.allclose(model.encoder.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))


def test_mismatched_and_missing_weight_files(tmp_path):
    other = smp.encoders.get_encoder("mobilenet_v2", in_channels=1, weights=None)
    path = tmp_path / "mobilenet.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(DomgenError, match="mobilenet.pt.*do not fit"):
        build_model("linknet", "resnet18", str(path))
    with pytest.raises(DomgenError, match="does not exist"):
        build_model("linknet", "resnet18", str(tmp_path / "absent.pt"))
    with pytest.raises(DomgenError, match="unknown architecture"):
        build_model("segformer2000", "resnet18")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_paper_architectures_build_and_run_on_odd_sizes_after_resize(arch):
    model = build_model(arch, "resnet18", "none").eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 64, 64))
    assert out.shape == (1, 1, 64, 64)
    trainable, total = count_parameters(model)
    assert trainable == total > 0


def test_a_checkpoint_tells_the_input_its_model_learnt_on(tmp_path):
    from domgen.families.leave_one_out import input_differences
    from domgen.models.checkpoint import load_checkpoint, save_checkpoint

    model = build_model("linknet", "resnet18", "none", 1)
    model_cfg = {"arch": "linknet", "encoder": "resnet18", "encoder_weights": "none", "in_channels": 1}
    ours = {"preprocessing": {"image_size": 128, "lung_mask": "threshold", "mask_to_lung": True, "normalisation": "zscore",
                              "target": "lesion", "keep_slices": "lung"}}
    # a transfer checkpoint keeps the preprocessing section; a leave-one-out one its whole config
    transfer = save_checkpoint(tmp_path / "t.pt", model, model_cfg, preprocessing={**ours["preprocessing"], "image_size": 64,
                                                                                   "mask_to_lung": False, "keep_slices": "all"})
    loo = save_checkpoint(tmp_path / "l.pt", model, model_cfg, config=ours)
    bare = save_checkpoint(tmp_path / "b.pt", model, model_cfg)
    assert input_differences(load_checkpoint(transfer)[0], ours) == "image_size 64 -> 128; mask_to_lung false -> true"
    assert input_differences(load_checkpoint(loo)[0], ours) == ""
    assert input_differences(load_checkpoint(bare)[0], ours) == ""  # the checkpoint does not say
    assert input_differences(None, ours) == ""  # no start model
