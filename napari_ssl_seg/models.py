"""Backbones for the methods: MONAI ``BasicUNet`` and a two-headed variant.

Networks take ``(B, C, H, W)`` (``spatial_dims=2``) or ``(B, C, D, H, W)`` (``spatial_dims=3``)
float32 tensors; each spatial size should be divisible by 16 (four poolings), otherwise
``BasicUNet`` pads the skip connections. Also here: the EMA update of mean-teacher methods
and the shared eval-mode softmax prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.layers import Conv
from monai.networks.nets import BasicUNet
from monai.utils import look_up_option
from torch import nn

from napari_ssl_seg.errors import InvalidInputError
from napari_ssl_seg.methods.base import NetworkConfig

__all__ = ["build_unet", "DualHeadUNet", "ema_update", "predict_softmax", "check_image"]

NORMS = ("batch", "instance", "group", "none")


def _norm_layer(network: NetworkConfig) -> tuple[str, dict] | None:
    """MONAI norm spec for ``network.norm`` (affine everywhere; BasicUNet defaults to
    instance); None for "none" (plain convolutions with biases)."""
    name = look_up_option(network.norm, NORMS)
    if name == "none":
        return None
    if name == "group":
        # Groups must divide every level's width; 8 or fewer as in common GroupNorm setups.
        return ("group", {"num_groups": math.gcd(8, *network.features), "affine": True})
    return (name, {"affine": True})


def build_unet(
    *, spatial_dims: int, in_channels: int, out_channels: int, network: NetworkConfig
) -> BasicUNet:
    """A MONAI ``BasicUNet`` configured from ``network``.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels, out_channels : int
        Input channels (1 for 2D, 3 for 2.5D) and output logits.
    network : NetworkConfig
        ``features`` (6 ints), ``norm`` ("none", "batch", "instance" or "group") and
        ``dropout``.

    Returns
    -------
    BasicUNet
        Maps (B, in_channels, *spatial) to (B, out_channels, *spatial) logits.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if in_channels < 1 or out_channels < 1:
        raise ValueError(
            f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}"
        )
    if len(network.features) != 6 or min(network.features) < 1:
        raise ValueError(f"network.features must be 6 positive ints, got {network.features}")
    if not 0.0 <= network.dropout < 1.0:
        raise ValueError(f"network.dropout must be in [0, 1), got {network.dropout}")
    return BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        features=tuple(network.features),
        norm=_norm_layer(network),
        dropout=network.dropout,
    )


class DualHeadUNet(nn.Module):
    """``BasicUNet`` body with a segmentation head and a signed-distance head (DTC).

    Both heads are 1x1 convolutions on the last decoder feature map, as in DTC's
    ``VNet_sdf``. The distance head has one channel per foreground class (one binary
    level set per class, DTC issue #16), squashed by tanh into (-1, 1).

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
    num_classes : int
        K, background included (>= 2).
    network : NetworkConfig
    """

    def __init__(
        self, *, spatial_dims: int, in_channels: int, num_classes: int, network: NetworkConfig
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.body = build_unet(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1, network=network
        )
        self.body.final_conv = nn.Identity()  # the body now ends at the last decoder level
        conv = Conv["conv", spatial_dims]
        width = network.features[5]
        self.seg_head = conv(width, num_classes, kernel_size=1)
        self.sdf_head = conv(width, num_classes - 1, kernel_size=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last decoder feature map: (B, C, *spatial) -> (B, features[5], *spatial)."""
        return self.body(x)

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply both heads to :meth:`features`; see :meth:`forward`."""
        return self.seg_head(features), torch.tanh(self.sdf_head(features))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits and signed distances.

        Parameters
        ----------
        x : (B, C, *spatial) float tensor

        Returns
        -------
        seg_logits : (B, K, *spatial) float tensor
        sdf : (B, K-1, *spatial) float tensor in (-1, 1)
            Negative inside class c+1 for channel c, positive outside.
        """
        return self.heads(self.features(x))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, for weights and float buffers.

    BatchNorm running statistics are averaged like the weights so that the teacher's eval
    mode uses statistics matching its weights; integer buffers (batch counters) are copied.
    """
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s, 1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if t.dtype.is_floating_point:
            t.lerp_(s, 1.0 - decay)
        else:
            t.copy_(s)


def check_image(image: torch.Tensor, *, in_channels: int, spatial_dims: int) -> None:
    """Raise if ``image`` is not a (B, in_channels, *spatial) float tensor."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    axes = "(B, C, H, W)" if spatial_dims == 2 else "(B, C, D, H, W)"
    if image.ndim != spatial_dims + 2 or image.shape[1] != in_channels:
        raise InvalidInputError(
            f"image must be {axes} with C = {in_channels}, got shape {tuple(image.shape)}"
        )
    if not image.is_floating_point():
        raise TypeError(f"image must be a float tensor, got dtype {image.dtype}")


def predict_softmax(
    networks: Sequence[nn.Module], image: torch.Tensor, *, in_channels: int, spatial_dims: int
) -> torch.Tensor:
    """Average softmax of ``networks`` in eval mode, without gradients.

    Each network's mode is restored afterwards, so this is safe in the middle of training.
    A network returning a tuple contributes its first element (the segmentation logits).

    Parameters
    ----------
    networks : sequence of nn.Module
    image : (B, C, *spatial) float32 tensor

    Returns
    -------
    (B, K, *spatial) float32 tensor
        Probabilities summing to 1 over axis 1.
    """
    check_image(image, in_channels=in_channels, spatial_dims=spatial_dims)
    if spatial_dims == 2:
        # NHWC input, as the engine lays out 2D networks (engine.build_method): faster on CPU.
        image = image.contiguous(memory_format=torch.channels_last)
    total = None
    for net in networks:
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                out = net(image)
        finally:
            net.train(was_training)
        logits = out[0] if isinstance(out, tuple) else out
        probs = logits.float().softmax(1)
        total = probs if total is None else total + probs
    return total / len(networks)
