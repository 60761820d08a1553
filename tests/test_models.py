"""Backbones: norm mapping, the dual-head UNet, EMA and the shared prediction helper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_ssl_seg.config import TrainConfig
from napari_ssl_seg.methods import NetworkConfig
from napari_ssl_seg.models import DualHeadUNet, build_unet, ema_update, predict_softmax

torch.set_num_threads(1)

FEATURES = (8, 8, 16, 16, 32, 8)


@pytest.mark.parametrize(
    ("norm", "layer"),
    [("batch", nn.BatchNorm2d), ("instance", nn.InstanceNorm2d), ("group", nn.GroupNorm)],
)
def test_build_unet_norms(norm, layer):
    net = build_unet(
        spatial_dims=2,
        in_channels=3,
        out_channels=4,
        network=NetworkConfig(features=FEATURES, norm=norm, dropout=0.1),
    )
    assert any(isinstance(m, layer) for m in net.modules())
    assert any(isinstance(m, nn.Dropout) and m.p == 0.1 for m in net.modules())
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 4, 32, 32)


def test_build_unet_without_norm_has_no_norm_layers():
    net = build_unet(
        spatial_dims=2, in_channels=1, out_channels=2, network=NetworkConfig(norm="none")
    )
    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)
    assert not any(isinstance(m, norms) for m in net.modules())
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is not None for c in convs)  # biases stand in for the norms'
    # Eval and train mode give the same output: nothing depends on the batch.
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        net.train()
        first = net(x)
        net.eval()
        assert torch.allclose(first, net(x))
        assert torch.allclose(net(x[:1]), first[:1], atol=1e-5)


def test_build_unet_default_has_no_norm_layers():
    net = build_unet(spatial_dims=3, in_channels=1, out_channels=2, network=NetworkConfig())
    assert not any(isinstance(m, nn.BatchNorm3d | nn.InstanceNorm3d) for m in net.modules())
    assert TrainConfig().norm == NetworkConfig().norm == "none"


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_dual_head_unet(shape):
    net = DualHeadUNet(
        spatial_dims=len(shape),
        in_channels=1,
        num_classes=3,
        network=NetworkConfig(features=FEATURES),
    )
    seg, sdf = net(torch.randn(2, 1, *shape))
    assert seg.shape == (2, 3, *shape) and sdf.shape == (2, 2, *shape)
    assert sdf.abs().max() < 1


def test_ema_update_and_predict_softmax():
    network = NetworkConfig(features=FEATURES)
    student = build_unet(spatial_dims=2, in_channels=1, out_channels=2, network=network)
    teacher = build_unet(spatial_dims=2, in_channels=1, out_channels=2, network=network)
    ema_update(teacher, student, 0.0)
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values(), strict=True):
        torch.testing.assert_close(t, s)
    image = torch.randn(2, 1, 32, 32)
    both = predict_softmax([student, teacher], image, in_channels=1, spatial_dims=2)
    one = predict_softmax([student], image, in_channels=1, spatial_dims=2)
    torch.testing.assert_close(both, one)
    assert student.training


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch"):
        build_unet(
            spatial_dims=2, in_channels=1, out_channels=2, network=NetworkConfig(norm="bach")
        )
    with pytest.raises(ValueError, match="features must be 6"):
        build_unet(
            spatial_dims=2, in_channels=1, out_channels=2, network=NetworkConfig(features=(8,))
        )
    with pytest.raises(ValueError, match="dropout must be in"):
        build_unet(
            spatial_dims=2, in_channels=1, out_channels=2, network=NetworkConfig(dropout=1.0)
        )
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        build_unet(spatial_dims=4, in_channels=1, out_channels=2, network=NetworkConfig())
    with pytest.raises(TypeError, match="got ndarray"):
        predict_softmax([nn.Identity()], torch.zeros(1).numpy(), in_channels=1, spatial_dims=2)
