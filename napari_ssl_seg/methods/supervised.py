"""Supervised baseline: weighted CE + Dice on the labelled batch, unlabelled data ignored.

The lower bound every semi-supervised method should beat (the "U-Net (labeled only)" rows
of the SSL4MIS tables). Label contract: on annotated voxels 0 is background and 1..K-1
are classes; voxels with weight 0 were never annotated and are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from napari_ssl_seg.losses import weighted_ce_dice
from napari_ssl_seg.methods import register
from napari_ssl_seg.methods._shared import check_labelled
from napari_ssl_seg.methods.base import Batch, SSLMethod
from napari_ssl_seg.models import build_unet, predict_softmax


@dataclass
class SupervisedSettings:
    """The supervised baseline has no settings of its own (network and schedule are shared)."""


@register
class Supervised(SSLMethod):
    """One UNet trained with 0.5 (CE + Dice) on annotated voxels only."""

    name = "supervised"
    summary = "UNet on the labelled slices only (weighted CE + Dice); the baseline."
    settings_class = SupervisedSettings
    uses_unlabelled = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = build_unet(
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            out_channels=self.num_classes,
            network=self.network,
        )

    def training_loss(
        self, labelled: Batch, unlabelled: Batch | None, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        check_labelled(labelled)
        loss = weighted_ce_dice(self.net(labelled.image), labelled.target, labelled.weight)
        return loss, {"supervised": loss.item()}

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        return predict_softmax(
            [self.net], image, in_channels=self.in_channels, spatial_dims=self.spatial_dims
        )
