"""Cross pseudo supervision (Chen et al., CVPR 2021), as in SSL4MIS.

Two UNets of the same architecture, initialised independently. Each learns from labels
and from the other's hard prediction on unlabelled data:

    L = sum over n in {a, b} of  L_sup(n) + w(t) * CE(n(x_u), argmax other(x_u))

Prediction averages both networks' softmaxes.

Label contract: on annotated voxels 0 is background and 1..K-1 are classes; voxels with
weight 0 were never annotated and are ignored by the supervised terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from napari_ssl_seg.losses import weighted_ce_dice
from napari_ssl_seg.methods import register
from napari_ssl_seg.methods._shared import check_fraction, check_non_negative, joint_images, ramp
from napari_ssl_seg.methods.base import Batch, SSLMethod
from napari_ssl_seg.models import build_unet, predict_softmax


@dataclass
class CPSSettings:
    """CPS knobs; interactive defaults, reference values in the comments."""

    consistency_weight: float = 0.1  # SSL4MIS 0.1
    # Ramp length as a fraction of the run; SSL4MIS 1.0 (200 x 150 of 30k iterations).
    rampup_fraction: float = 0.5

    def __post_init__(self) -> None:
        check_non_negative("consistency_weight", self.consistency_weight)
        check_fraction("rampup_fraction", self.rampup_fraction)


@register
class CPS(SSLMethod):
    """Two independently initialised UNets teaching each other with hard pseudo-labels."""

    name = "cps"
    summary = "Cross pseudo supervision: two UNets train on each other's argmax."
    settings_class = CPSSettings

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # Built one after the other, so they draw different initial weights.
        self.net_a, self.net_b = (
            build_unet(
                spatial_dims=self.spatial_dims,
                in_channels=self.in_channels,
                out_channels=self.num_classes,
                network=self.network,
            )
            for _ in range(2)
        )

    def ramp_weight(self, step: int) -> float:
        """Ramp in [0, 1] multiplying the cross-supervision weight at ``step``."""
        return ramp(
            step, total=self.total_iterations, rampup_fraction=self.settings.rampup_fraction
        )

    def training_loss(
        self, labelled: Batch, unlabelled: Batch, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        images, n_lab = joint_images(labelled, unlabelled)
        logits_a, logits_b = self.net_a(images), self.net_b(images)
        supervised = weighted_ce_dice(
            logits_a[:n_lab], labelled.target, labelled.weight
        ) + weighted_ce_dice(logits_b[:n_lab], labelled.target, labelled.weight)
        ramp_value = self.ramp_weight(step)
        u_a, u_b = logits_a[n_lab:], logits_b[n_lab:]
        if u_a.shape[0] > 0:
            cross = F.cross_entropy(u_a, u_b.detach().argmax(1)) + F.cross_entropy(
                u_b, u_a.detach().argmax(1)
            )
        else:
            cross = logits_a.sum() * 0.0
        consistency = self.settings.consistency_weight * ramp_value * cross
        loss = supervised + consistency
        return loss, {
            "supervised": supervised.item(),
            "consistency": consistency.item(),
            "ramp": ramp_value,
        }

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        return predict_softmax(
            [self.net_a, self.net_b],
            image,
            in_channels=self.in_channels,
            spatial_dims=self.spatial_dims,
        )
