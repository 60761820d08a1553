"""Mean teacher (Tarvainen & Valpola 2017), as in SSL4MIS ``train_mean_teacher_2D.py``.

The student learns from labels (weighted CE + Dice) and from agreeing with a teacher whose
weights are an exponential moving average of the student's:

    L = L_sup + w(t) * mean((softmax(student(x_u)) - softmax(teacher(x_u + noise)))^2)

with teacher input noise clamp(N(0, 0.1^2), -0.2, 0.2), w(t) = consistency_weight times a
sigmoid ramp, forced to 0 during a warm-up. The teacher is the deployed network.

Label contract: on annotated voxels 0 is background and 1..K-1 are classes; voxels with
weight 0 were never annotated and are ignored by the supervised term.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_ssl_seg.losses import weighted_ce_dice
from napari_ssl_seg.methods import register
from napari_ssl_seg.methods._shared import check_fraction, check_non_negative, joint_images, ramp
from napari_ssl_seg.methods.base import Batch, SSLMethod
from napari_ssl_seg.models import build_unet, ema_update, predict_softmax


@dataclass
class MeanTeacherSettings:
    """Mean-teacher knobs; interactive defaults, reference values in the comments."""

    ema_decay: float = 0.99  # paper 0.99
    consistency_weight: float = 0.1  # SSL4MIS 0.1
    # Ramp length as a fraction of the run; SSL4MIS 1.0 (200 x 150 of 30k iterations).
    rampup_fraction: float = 0.5
    # Consistency forced to 0 for this fraction; SSL4MIS 1000 of 30k iterations (0.033).
    # Short interactive runs need a longer share before the teacher is worth copying.
    warmup_fraction: float = 0.15
    noise_std: float = 0.1  # paper 0.1
    noise_clip: float = 0.2  # paper 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check_fraction("rampup_fraction", self.rampup_fraction)
        check_fraction("warmup_fraction", self.warmup_fraction)
        for name in ("consistency_weight", "noise_std", "noise_clip"):
            check_non_negative(name, getattr(self, name))


@register
class MeanTeacher(SSLMethod):
    """Student UNet + EMA teacher with a softmax-MSE consistency on unlabelled data."""

    name = "mean-teacher"
    summary = "Mean teacher: EMA teacher, softmax MSE consistency on unlabelled slices."
    settings_class = MeanTeacherSettings

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.student = self._build_network()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def _build_network(self) -> nn.Module:
        """The student architecture (the teacher is a copy); subclasses swap it."""
        return build_unet(
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            out_channels=self.num_classes,
            network=self.network,
        )

    def ramp_weight(self, step: int) -> float:
        """Ramp in [0, 1] multiplying the consistency weight at ``step``."""
        s = self.settings
        return ramp(
            step,
            total=self.total_iterations,
            rampup_fraction=s.rampup_fraction,
            warmup_fraction=s.warmup_fraction,
        )

    def _noisy(self, image: torch.Tensor) -> torch.Tensor:
        """Teacher input: image + clamp(N(0, std^2), -clip, clip)."""
        s = self.settings
        noise = (torch.randn_like(image) * s.noise_std).clamp(-s.noise_clip, s.noise_clip)
        return image + noise

    def _consistency(
        self, student_logits: torch.Tensor, image: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Unweighted consistency of the student's unlabelled logits with the teacher."""
        with torch.no_grad():
            teacher_probs = self.teacher(self._noisy(image)).softmax(1)
        return F.mse_loss(student_logits.softmax(1), teacher_probs), {}

    def training_loss(
        self, labelled: Batch, unlabelled: Batch, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        images, n_lab = joint_images(labelled, unlabelled)
        logits = self.student(images)
        supervised = weighted_ce_dice(logits[:n_lab], labelled.target, labelled.weight)
        ramp_value = self.ramp_weight(step)
        weight = self.settings.consistency_weight * ramp_value
        parts: dict[str, float] = {}
        consistency = logits.new_zeros(())
        if weight > 0 and unlabelled.image.shape[0] > 0:
            raw, parts = self._consistency(logits[n_lab:], unlabelled.image, step)
            consistency = weight * raw
        loss = supervised + consistency
        return loss, {
            "supervised": supervised.item(),
            "consistency": consistency.item(),
            "ramp": ramp_value,
            **parts,
        }

    def after_step(self, step: int) -> None:
        # Early on the teacher follows the student closely (SSL4MIS update_ema_variables).
        decay = min(1.0 - 1.0 / (step + 1), self.settings.ema_decay)
        ema_update(self.teacher, self.student, decay)

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        return predict_softmax(
            [self.teacher], image, in_channels=self.in_channels, spatial_dims=self.spatial_dims
        )
