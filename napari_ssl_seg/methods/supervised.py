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
    """Knobs of the supervised baseline (network and schedule are shared by all methods)."""

    # Independently initialised UNets, trained on alternate iterations (each sees its own
    # 1/networks of the batches and steps) and averaged at prediction: the same training
    # time, ``networks`` times the prediction time. 1 is the plain baseline.
    networks: int = 1

    def __post_init__(self) -> None:
        if self.networks < 1:
            raise ValueError(f"networks must be an integer >= 1, got {self.networks}")


@register
class Supervised(SSLMethod):
    """UNet(s) trained with 0.5 (CE + Dice) on annotated voxels only."""

    name = "supervised"
    summary = "UNet on the labelled slices only (weighted CE + Dice); the baseline."
    settings_class = SupervisedSettings
    uses_unlabelled = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        build = lambda: build_unet(  # noqa: E731
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            out_channels=self.num_classes,
            network=self.network,
        )
        # ``net`` keeps its name so single-network checkpoints load as before.
        self.net = build()
        self.more_nets = torch.nn.ModuleList(build() for _ in range(self.settings.networks - 1))

    @property
    def nets(self) -> list[torch.nn.Module]:
        """Every network of the ensemble, ``net`` first."""
        return [self.net, *self.more_nets]

    def training_loss(
        self, labelled: Batch, unlabelled: Batch | None, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        check_labelled(labelled)
        net = self.nets[step % len(self.nets)]  # the others get no gradient this step
        loss = weighted_ce_dice(net(labelled.image), labelled.target, labelled.weight)
        return loss, {"supervised": loss.item()}

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        return predict_softmax(
            self.nets, image, in_channels=self.in_channels, spatial_dims=self.spatial_dims
        )
