"""The small interface every semi-supervised method implements.

A method is a ``torch.nn.Module`` that owns its networks (student, teacher, twin...)
and knows its loss. The engine (``napari_ssl_seg.engine``) owns everything else: data,
optimiser, schedule, checkpoints, progress and inference. Adding a method is adding one
module under ``methods/`` that subclasses :class:`SSLMethod` and calls
:func:`napari_ssl_seg.methods.register`.

Label contract (repeated wherever labels are taken): on annotated voxels 0 is background
and 1..K-1 are classes; voxels nobody annotated carry weight 0 and are never background.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch


@dataclass
class Batch:
    """One mini-batch of slices (2D), stacked slices (2.5D) or patches (3D).

    Attributes
    ----------
    image : (B, C, H, W) or (B, C, D, H, W) float32 tensor
        Normalised intensities.
    target : (B, H, W) or (B, D, H, W) int64 tensor, optional
        Class index per voxel (0 = background). ``None`` for unlabelled batches.
    weight : same shape as ``target``, float32 tensor, optional
        Loss weight per voxel: 1 for human labels, the pseudo-label weight for confident
        pseudo-labels of an earlier round, 0 where nothing is known (ignored).
    """

    image: torch.Tensor
    target: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``; 2D images in channels-last layout (see the engine)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        image = move(self.image)
        if image.ndim == 4:
            image = image.contiguous(memory_format=torch.channels_last)
        return Batch(image, move(self.target), move(self.weight))


@dataclass(frozen=True)
class NetworkConfig:
    """Backbone settings shared by every method (MONAI ``BasicUNet``).

    Attributes
    ----------
    features : tuple of 6 ints
        Channels of the encoder levels and of the last decoder level. The SSL4MIS 2D UNet
        uses (16, 32, 64, 128, 256, 32); a narrower net trains faster on a CPU.
    norm : {"none", "batch", "instance", "group"}
        None by default (``TrainConfig.norm`` gives the figures): with instance norm a net
        trained on one slice paints foreground over empty slices (Dice 0.535 against
        0.980 with batch norm on the sample), and batch norm over a batch of two small
        crops normalises away what tells a dim nuclear cap from a nucleus.
    dropout : float
        Dropout probability inside the UNet blocks (0 = off).
    """

    features: tuple[int, ...] = (16, 32, 64, 128, 256, 16)
    norm: str = "none"
    dropout: float = 0.0


class SSLMethod(torch.nn.Module):
    """Base class of semi-supervised methods.

    Parameters
    ----------
    in_channels : int
        Channels of the network input (1 for 2D, 3 for 2.5D with one neighbour each side).
    num_classes : int
        Classes including background (>= 2); every network outputs this many logits.
    spatial_dims : {2, 3}
        2 for slice-wise training (2D and 2.5D), 3 for patches.
    total_iterations : int
        Length of the training run, so ramps can be expressed as fractions of it.
    network : NetworkConfig
        Backbone settings.
    settings : dataclass instance of ``settings_class``
        The method's own knobs.
    """

    #: Name in the registry and on the command line.
    name: ClassVar[str] = ""
    #: One-line description for ``napari-ssl-seg methods``.
    summary: ClassVar[str] = ""
    #: Dataclass of the method's settings (interactive defaults; paper values in comments).
    settings_class: ClassVar[type] = type(None)
    #: False for a method that learns from labelled batches only: the engine then skips
    #: drawing (and augmenting) the unlabelled batch and passes None.
    uses_unlabelled: ClassVar[bool] = True

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        spatial_dims: int,
        total_iterations: int,
        network: NetworkConfig,
        settings: Any,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + classes), got {num_classes}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.total_iterations = max(1, int(total_iterations))
        self.network = network
        self.settings = settings

    # --- training -----------------------------------------------------------------
    def training_loss(
        self, labelled: Batch, unlabelled: Batch | None, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss of one iteration and named float parts for the log.

        ``labelled`` has ``target`` and ``weight``; ``unlabelled`` has only ``image``
        (None when the class sets ``uses_unlabelled = False``).
        ``step`` counts from 0 to ``total_iterations - 1``.
        """
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimiser step (EMA updates live here)."""

    # --- optional unsupervised pretraining (stage 1 of the diffusion teacher) ----
    def pretrain_iterations(self) -> int:
        """How many label-free pretraining iterations the method wants (0 = none)."""
        return 0

    def pretrain_loss(self, unlabelled: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one label-free pretraining iteration."""
        raise NotImplementedError

    def pretrain_state(self) -> dict[str, torch.Tensor]:
        """Weights produced by pretraining, kept in the project and reused by later rounds."""
        return {}

    def load_pretrain_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by :meth:`pretrain_state`."""

    # --- inference ----------------------------------------------------------------
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities of ``image``.

        Parameters
        ----------
        image : (B, C, H, W) or (B, C, D, H, W) float32 tensor

        Returns
        -------
        (B, K, H, W) or (B, K, D, H, W) float32 tensor
            Softmax probabilities from the network the method deploys (the teacher for
            mean-teacher methods). Deterministic in eval mode.
        """
        raise NotImplementedError

    @classmethod
    def make_settings(cls, overrides: dict[str, Any] | None = None) -> Any:
        """Build the settings dataclass, rejecting unknown keys with the allowed ones."""
        overrides = dict(overrides or {})
        allowed = {f.name: f for f in fields(cls.settings_class)}
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown setting(s) {unknown} for method {cls.name!r}; allowed: {sorted(allowed)}"
            )
        for key, value in list(overrides.items()):
            default = getattr(cls.settings_class(), key)
            if isinstance(default, bool):
                value = (
                    value
                    if isinstance(value, bool)
                    else str(value).lower() in ("1", "true", "yes")
                )
            elif isinstance(default, int | float) and not isinstance(value, type(default)):
                value = type(default)(value)
            overrides[key] = value
        return cls.settings_class(**overrides)
