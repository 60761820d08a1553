"""Dual-task consistency (Luo et al., AAAI 2021), repo ``Luoxd1996/DTC``.

One UNet with a segmentation head (K logits) and a tanh signed-distance head (one level
set per foreground class). The heads must agree through the smooth Heaviside
sigmoid(-k sdf), on labelled and unlabelled data alike:

    L = L_seg + beta * MSE_w(sdf, SDF(y)) + lambda(t) * mean((sigmoid(-k sdf) - p_fg)^2)

where p_fg is the softmax probability of each foreground class. Prediction uses the
segmentation head.

Label contract: on annotated voxels 0 is background and 1..K-1 are classes; voxels with
weight 0 were never annotated and are ignored by the supervised terms (the SDF targets
are built from annotated voxels only, and left out where an unannotated voxel or the crop
edge is nearer than the distance they give, see
:func:`~napari_ssl_seg.losses.masked_sdf_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from napari_ssl_seg.losses import (
    foreground_probs,
    heaviside,
    masked_sdf_targets,
    weighted_ce_dice,
    weighted_mse,
)
from napari_ssl_seg.methods import register
from napari_ssl_seg.methods._shared import check_fraction, check_non_negative, joint_images, ramp
from napari_ssl_seg.methods.base import Batch, SSLMethod
from napari_ssl_seg.models import DualHeadUNet, predict_softmax


@dataclass
class DTCSettings:
    """DTC knobs; interactive defaults, paper values in the comments."""

    sdf_weight: float = 0.3  # beta; paper 0.3
    consistency_weight: float = 1.0  # lambda max; paper 1.0
    # Heaviside sharpness; paper 1500. With SDFs normalised to [-1, 1], 1500 is a step one
    # voxel from the boundary (no gradient beyond); 100 keeps a band of ~2 voxels for an
    # object of radius 60 voxels, so short CPU runs still get a consistency gradient.
    heaviside_k: float = 100.0
    # Ramp length as a fraction of the run; paper 1.0 (40 x 150 of 6000 iterations).
    rampup_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name in ("sdf_weight", "consistency_weight"):
            check_non_negative(name, getattr(self, name))
        if self.heaviside_k <= 0:
            raise ValueError(f"heaviside_k must be > 0, got {self.heaviside_k}")
        check_fraction("rampup_fraction", self.rampup_fraction)


@register
class DTC(SSLMethod):
    """Dual-head UNet with a segmentation/level-set consistency on all data."""

    name = "dtc"
    summary = "Dual-task consistency: segmentation and signed-distance heads must agree."
    settings_class = DTCSettings

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = DualHeadUNet(
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            network=self.network,
        )

    def ramp_weight(self, step: int) -> float:
        """Ramp in [0, 1] multiplying the dual-task consistency weight at ``step``."""
        return ramp(
            step, total=self.total_iterations, rampup_fraction=self.settings.rampup_fraction
        )

    def training_loss(
        self, labelled: Batch, unlabelled: Batch, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        images, n_lab = joint_images(labelled, unlabelled)
        logits, sdf = self.net(images)
        target, weight = labelled.target, labelled.weight
        supervised = weighted_ce_dice(logits[:n_lab], target, weight)
        sdf_target, sdf_trusted = masked_sdf_targets(target, weight, self.num_classes)
        sdf_loss = s.sdf_weight * weighted_mse(sdf[:n_lab], sdf_target, sdf_trusted)
        ramp_value = self.ramp_weight(step)
        dual = torch.mean((heaviside(sdf, s.heaviside_k) - foreground_probs(logits)) ** 2)
        consistency = s.consistency_weight * ramp_value * dual
        loss = supervised + sdf_loss + consistency
        return loss, {
            "supervised": supervised.item(),
            "sdf": sdf_loss.item(),
            "consistency": consistency.item(),
            "ramp": ramp_value,
        }

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        return predict_softmax(
            [self.net], image, in_channels=self.in_channels, spatial_dims=self.spatial_dims
        )
