"""Dual-task mutual learning (Zhang & Zhang, PRCV 2021), repo ``YichiZhang98/DTML``.

Two networks instead of DTC's two heads (author, DTML issue #1): a segmentation UNet and
a distance UNet whose tanh output is one signed distance map per foreground class.

    L_cons = mean((sigmoid(-k dis(x)) - p_fg(seg(x)))^2)
    L_seg  = 0.5 (CE + Dice)(seg(x_l), y) + lambda(t) L_cons
    L_dis  = Dice(sigmoid(-k dis(x_l)), y) + gamma * MSE_w(dis(x_l), SDF(y)) + lambda(t) L_cons
    L      = L_seg + L_dis

over labelled and unlabelled x for the consistency. Each network's loss carries the
consistency, as in the released code (``model_seg_loss`` and ``model_dis_loss``, each
backpropagated into both networks), so one backward of L gives both networks the
gradient of 2 lambda(t) L_cons, as the code's two backward calls do. gamma = 0 reproduces
the released code, which computes the SDF regression but adds it to no loss. Prediction
uses the segmentation network.

Label contract: on annotated voxels 0 is background and 1..K-1 are classes; voxels with
weight 0 were never annotated and are ignored by the supervised terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from napari_ssl_seg.losses import (
    foreground_onehot,
    foreground_probs,
    heaviside,
    masked_sdf_targets,
    weighted_ce_dice,
    weighted_dice_loss,
    weighted_mse,
)
from napari_ssl_seg.methods import register
from napari_ssl_seg.methods._shared import check_fraction, check_non_negative, joint_images, ramp
from napari_ssl_seg.methods.base import Batch, SSLMethod
from napari_ssl_seg.models import build_unet, predict_softmax


@dataclass
class DTMLSettings:
    """DTML knobs; interactive defaults, reference values in the comments."""

    # lambda max, in each network's loss; code 1.0 (``--consistency``). L_cons is in both
    # losses, so each network gets the gradient of 2 lambda L_cons, as in the code.
    consistency_weight: float = 1.0
    # Heaviside sharpness; paper 1500 (see DTCSettings.heaviside_k for why 100).
    heaviside_k: float = 100.0
    # SDF regression on the distance net; code 0 (computed, never added). With a softer k
    # the Heaviside Dice only fixes the sign of the map, so a dense distance target helps.
    sdf_weight: float = 0.3
    # Ramp length as a fraction of the run; paper 1.0 (40 x 150 of 6000 iterations).
    rampup_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name in ("consistency_weight", "sdf_weight"):
            check_non_negative(name, getattr(self, name))
        if self.heaviside_k <= 0:
            raise ValueError(f"heaviside_k must be > 0, got {self.heaviside_k}")
        check_fraction("rampup_fraction", self.rampup_fraction)


@register
class DTML(SSLMethod):
    """A segmentation UNet and a distance UNet tied by a cross-task consistency."""

    name = "dtml"
    summary = "Dual-task mutual learning: a segmentation net and a distance net agree."
    settings_class = DTMLSettings

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        common = {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "network": self.network,
        }
        self.seg_net = build_unet(out_channels=self.num_classes, **common)
        # One output per foreground class; the released code reuses the two-head VNet and
        # leaves one head of each network unused, we build only the heads that train.
        self.distance_net = build_unet(out_channels=self.num_classes - 1, **common)

    def ramp_weight(self, step: int) -> float:
        """Ramp in [0, 1] multiplying the mutual consistency weight at ``step``."""
        return ramp(
            step, total=self.total_iterations, rampup_fraction=self.settings.rampup_fraction
        )

    def training_loss(
        self, labelled: Batch, unlabelled: Batch, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        images, n_lab = joint_images(labelled, unlabelled)
        target, weight = labelled.target, labelled.weight
        logits = self.seg_net(images)
        sdf = torch.tanh(self.distance_net(images))
        level = heaviside(sdf, s.heaviside_k)
        supervised = weighted_ce_dice(logits[:n_lab], target, weight)
        known = torch.where(weight > 0, target, torch.zeros_like(target))
        distance = weighted_dice_loss(
            level[:n_lab], foreground_onehot(known, self.num_classes), weight
        )
        sdf_target, sdf_trusted = masked_sdf_targets(target, weight, self.num_classes)
        sdf_loss = s.sdf_weight * weighted_mse(sdf[:n_lab], sdf_target, sdf_trusted)
        ramp_value = self.ramp_weight(step)
        mutual = torch.mean((level - foreground_probs(logits)) ** 2)
        # once in the segmentation net's loss and once in the distance net's (see above)
        consistency = 2 * s.consistency_weight * ramp_value * mutual
        loss = supervised + distance + sdf_loss + consistency
        return loss, {
            "supervised": supervised.item(),
            "distance": distance.item(),
            "sdf": sdf_loss.item(),
            "consistency": consistency.item(),
            "ramp": ramp_value,
        }

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        return predict_softmax(
            [self.seg_net], image, in_channels=self.in_channels, spatial_dims=self.spatial_dims
        )
