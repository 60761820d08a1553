"""SimCVD-lite: simple contrastive voxel-wise distillation (You et al., IEEE TMI 2022).

No code was released; this follows the abstract and the usual reading of the paper
(``docs/methods.md`` section 4): a mean teacher whose networks are DTC-style dual-head
UNets with dropout, so that student and teacher see two "views" of the same input that
differ only in their dropout masks. On top of the supervised segmentation + SDF losses:

- MT consistency: softmax MSE between student and teacher on unlabelled data;
- voxel-wise InfoNCE between L2-normalised student and teacher embeddings (a small
  projection of the last decoder features) at ``num_sampled_voxels`` random voxels; the
  positive of a student voxel is the teacher embedding of the same voxel;
- pair-wise similarity distillation: MSE between the student's and the teacher's cosine
  similarity matrices on the first ``num_pairwise_voxels`` of those voxels.

The three unsupervised terms share the mean-teacher ramp and warm-up. The teacher is the
deployed network.

Label contract: on annotated voxels 0 is background and 1..K-1 are classes; voxels with
weight 0 were never annotated and are ignored by the supervised terms.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv
from torch import nn

from napari_ssl_seg.losses import masked_sdf_targets, weighted_ce_dice, weighted_mse
from napari_ssl_seg.methods import register
from napari_ssl_seg.methods._shared import check_non_negative, joint_images
from napari_ssl_seg.methods.base import Batch, NetworkConfig
from napari_ssl_seg.methods.mean_teacher import MeanTeacher, MeanTeacherSettings
from napari_ssl_seg.models import DualHeadUNet


@dataclass
class SimCVDSettings(MeanTeacherSettings):
    """Mean-teacher knobs plus the contrastive ones. The paper gives none of the latter
    ([n/a] in the digest): the defaults are common starting points, not SimCVD's values."""

    noise_std: float = 0.0  # mean teacher 0.1; SimCVD's views differ by dropout only
    # Dropout used when the network config has none (views must differ); the paper's
    # V-Net has Dropout3d(0.5) at the bottleneck and before the head.
    view_dropout: float = 0.1
    sdf_weight: float = 0.3  # supervised SDF regression weight; DTC's beta 0.3
    lambda_contrast: float = 0.1  # paper n/a; digest suggests 0.1
    lambda_pd: float = 0.1  # paper n/a; digest suggests 0.1
    # InfoNCE temperature; paper n/a (common 0.07-0.5). Random voxels of the same class
    # are near-duplicate negatives, and a high temperature pushes them apart less.
    tau: float = 0.5
    num_sampled_voxels: int = 512  # paper n/a; digest suggests 1-4k (CPU: 512)
    num_pairwise_voxels: int = 128  # paper n/a; an N x N matrix, digest <= 512
    projection_dim: int = 32  # embedding size of the projection head; paper n/a

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.view_dropout < 1.0:
            raise ValueError(f"view_dropout must be in (0, 1), got {self.view_dropout}")
        for name in ("sdf_weight", "lambda_contrast", "lambda_pd"):
            check_non_negative(name, getattr(self, name))
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        for name in ("num_sampled_voxels", "num_pairwise_voxels", "projection_dim"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")


class ContrastiveDualHeadUNet(nn.Module):
    """:class:`DualHeadUNet` plus a 1x1 projection head on the last decoder features.

    ``forward`` returns the segmentation logits only (so mean-teacher code and prediction
    treat it as a plain segmentation network); :meth:`forward_all` returns
    ``(seg_logits (B, K, *sp), sdf (B, K-1, *sp), embedding (B, projection_dim, *sp))``
    with the embedding L2-normalised over channels.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        network: NetworkConfig,
        projection_dim: int,
    ) -> None:
        super().__init__()
        self.unet = DualHeadUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=num_classes,
            network=network,
        )
        conv, width = Conv["conv", spatial_dims], network.features[5]
        self.projection = nn.Sequential(
            conv(width, width, kernel_size=1),
            nn.ReLU(),
            conv(width, projection_dim, kernel_size=1),
        )

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.unet.features(x)
        seg, sdf = self.unet.heads(features)
        return seg, sdf, F.normalize(self.projection(features), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)[0]


def sample_voxels(
    student: torch.Tensor, teacher: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ``count`` random voxels of two (B, D, *sp) maps, as two (count, D) tensors."""
    flat_s = student.movedim(1, -1).reshape(-1, student.shape[1])
    flat_t = teacher.movedim(1, -1).reshape(-1, teacher.shape[1])
    index = torch.randperm(flat_s.shape[0], device=student.device)[:count]
    return flat_s[index], flat_t[index]


def info_nce(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE of (N, D) unit vectors: row i of ``student`` must pick row i of ``teacher``."""
    logits = student @ teacher.T / tau
    return F.cross_entropy(logits, torch.arange(student.shape[0], device=student.device))


def similarity_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the (M, M) cosine-similarity matrices of (M, D) unit vectors."""
    return F.mse_loss(student @ student.T, teacher @ teacher.T)


@register
class SimCVD(MeanTeacher):
    """Mean teacher of dual-head UNets with voxel contrast and similarity distillation."""

    name = "simcvd"
    summary = "SimCVD-lite: dual-head mean teacher + voxel InfoNCE + similarity distillation."
    settings_class = SimCVDSettings

    def _build_network(self) -> nn.Module:
        network = self.network
        if network.dropout == 0:
            network = replace(network, dropout=self.settings.view_dropout)
        return ContrastiveDualHeadUNet(
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            network=network,
            projection_dim=self.settings.projection_dim,
        )

    def training_loss(
        self, labelled: Batch, unlabelled: Batch, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        images, n_lab = joint_images(labelled, unlabelled)
        target, weight = labelled.target, labelled.weight
        seg, sdf, emb = self.student.forward_all(images)
        supervised = weighted_ce_dice(seg[:n_lab], target, weight)
        sdf_target, sdf_trusted = masked_sdf_targets(target, weight, self.num_classes)
        sdf_loss = s.sdf_weight * weighted_mse(sdf[:n_lab], sdf_target, sdf_trusted)
        ramp_value = self.ramp_weight(step)
        consistency = contrast = pairwise = seg.new_zeros(())
        if ramp_value > 0:
            with torch.no_grad():
                teacher_seg, _, teacher_emb = self.teacher.forward_all(self._noisy(images))
            if images.shape[0] > n_lab:
                mse = F.mse_loss(seg[n_lab:].softmax(1), teacher_seg[n_lab:].softmax(1))
                consistency = s.consistency_weight * ramp_value * mse
            z_s, z_t = sample_voxels(emb, teacher_emb, s.num_sampled_voxels)
            contrast = s.lambda_contrast * ramp_value * info_nce(z_s, z_t, s.tau)
            m = s.num_pairwise_voxels
            pairwise = s.lambda_pd * ramp_value * similarity_distillation(z_s[:m], z_t[:m])
        loss = supervised + sdf_loss + consistency + contrast + pairwise
        return loss, {
            "supervised": supervised.item(),
            "sdf": sdf_loss.item(),
            "consistency": consistency.item(),
            "contrast": contrast.item(),
            "pairwise": pairwise.item(),
            "ramp": ramp_value,
        }
