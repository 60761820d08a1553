"""Uncertainty-aware mean teacher (Yu et al., MICCAI 2019), as in SSL4MIS.

A mean teacher whose consistency only counts voxels where the teacher is certain. The
teacher runs T times on the unlabelled batch, each with fresh input noise; the entropy
u of the mean softmax is the uncertainty, and voxels with u below

    tau(t) = (0.75 + 0.25 * sigmoid_rampup(t, total_iterations)) * ln K

enter the masked softmax MSE  sum(mask * (p_s - p_t)^2) / (K * sum(mask)).

Label contract: on annotated voxels 0 is background and 1..K-1 are classes; voxels with
weight 0 were never annotated and are ignored by the supervised term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from napari_ssl_seg.losses import sigmoid_rampup
from napari_ssl_seg.methods import register
from napari_ssl_seg.methods.mean_teacher import MeanTeacher, MeanTeacherSettings


@dataclass
class UAMTSettings(MeanTeacherSettings):
    """Mean-teacher knobs plus the number of stochastic teacher passes."""

    # Teacher passes per step for the uncertainty; paper 8 (4 passes over a doubled
    # batch). Each is a forward pass without gradient: 4 keeps CPU steps affordable.
    uncertainty_passes: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.uncertainty_passes < 2:
            raise ValueError(f"uncertainty_passes must be >= 2, got {self.uncertainty_passes}")


@register
class UAMT(MeanTeacher):
    """Mean teacher with an entropy mask from T noisy teacher passes."""

    name = "ua-mt"
    summary = "Uncertainty-aware mean teacher: consistency only where T teacher passes agree."
    settings_class = UAMTSettings

    def _consistency(
        self, student_logits: torch.Tensor, image: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            passes = torch.stack(
                [
                    self.teacher(self._noisy(image)).softmax(1)
                    for _ in range(self.settings.uncertainty_passes)
                ]
            )
            mean = passes.mean(0)
            uncertainty = -(mean * torch.log(mean + 1e-6)).sum(1, keepdim=True)
            ramp = sigmoid_rampup(step, self.total_iterations)
            threshold = (0.75 + 0.25 * ramp) * math.log(self.num_classes)
            mask = (uncertainty < threshold).float()
        # The first pass is the consistency target: SSL4MIS draws one more noisy pass for
        # it, which has the same distribution, so we save that forward.
        squared = (student_logits.softmax(1) - passes[0]) ** 2
        # Mean over certain voxels and classes; SSL4MIS divides by 2 * sum(mask), the
        # same for K = 2 but not a mean for K > 2.
        raw = (mask * squared).sum() / (self.num_classes * mask.sum() + 1e-16)
        return raw, {"certain_fraction": mask.mean().item()}
