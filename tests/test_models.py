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
    from domgen.typed_config import typed

    model = build_model("linknet", "resnet18", "none", 1)
    model_cfg = {"arch": "linknet", "encoder": "resnet18", "encoder_weights": "none", "in_channels": 1}
    ours = {"preprocessing": {"image_size": 128, "lung_mask": "threshold", "mask_to_lung": True, "normalisation": "zscore",
                              "target": "lesion", "keep_slices": "lung"}}
    # a transfer checkpoint keeps the preprocessing section; a leave-one-out one its whole config
    transfer = save_checkpoint(tmp_path / "t.pt", model, model_cfg, preprocessing={**ours["preprocessing"], "image_size": 64,
                                                                                   "mask_to_lung": False, "keep_slices": "all"})
    loo = save_checkpoint(tmp_path / "l.pt", model, model_cfg, config=ours)
    bare = save_checkpoint(tmp_path / "b.pt", model, model_cfg)
    cfg = typed(ours, "leave-one-out")
    assert input_differences(load_checkpoint(transfer)[0], cfg) == "image_size 64 -> 128; mask_to_lung false -> true"
    assert input_differences(load_checkpoint(loo)[0], cfg) == ""
    assert input_differences(load_checkpoint(bare)[0], cfg) == ""  # the checkpoint does not say
    assert input_differences(None, cfg) == ""  # no start model


def _hub_snapshot(cache, encoder: str, weights: str = "imagenet") -> torch.nn.Module:
    """An ImageNet-shaped encoder written into a Hugging Face cache layout, where smp's hf_hub_download looks for it."""
    import json

    from safetensors.torch import save_file

    settings = smp.encoders.encoders[encoder]["pretrained_settings"][weights]
    torch.manual_seed(7)
    donor = smp.encoders.get_encoder(encoder, in_channels=3, weights=None)
    snapshot = cache / f"models--{settings['repo_id'].replace('/', '--')}" / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"encoder": encoder}))
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(snapshot / "model.safetensors"))
    return donor


def test_imagenet_weights_come_from_the_local_cache_without_the_network(tmp_path, monkeypatch):
    import huggingface_hub.constants

    import domgen.models as models

    donor = _hub_snapshot(tmp_path, "resnet18")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "hub_reachable", lambda *a: pytest.fail("the network was asked although the cache has the file"))
    model = build_model("linknet", "resnet18", "imagenet")
    assert torch.equal(model.encoder.layer1[0].conv1.weight, donor.layer1[0].conv1.weight)
    assert torch.allclose(model.encoder.conv1.weight, donor.conv1.weight.sum(1, keepdim=True))  # smp: 3 -> 1 channel


def test_missing_imagenet_weights_offline_fail_at_once_in_one_sentence(tmp_path, monkeypatch, caplog):
    import socket
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nobody listens on: the hub "cannot be reached"
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(DomgenError) as err:
        build_model("linknet", "resnet18", "imagenet")
    assert time.monotonic() - start < 5  # huggingface_hub's own retries took about 25 s
    assert "not in the Hugging Face cache" in str(err.value) and "--encoder-weights none" in str(err.value)
    assert "Retry" not in caplog.text
    # with the hub's offline switch on, the network is not even probed
    import domgen.models as models

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(models, "hub_reachable", lambda *a: pytest.fail("probed the network in offline mode"))
    with pytest.raises(DomgenError):
        build_model("linknet", "resnet18", "imagenet")
