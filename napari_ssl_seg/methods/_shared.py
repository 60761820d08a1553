"""Small pieces shared by the method modules: batch checks and the consistency ramp."""

from __future__ import annotations

import torch

from napari_ssl_seg.errors import InvalidInputError
from napari_ssl_seg.losses import sigmoid_rampup
from napari_ssl_seg.methods.base import Batch


def check_labelled(labelled: Batch) -> None:
    """Raise unless ``labelled`` has a target and a weight shaped like its image.

    Label contract: on annotated voxels 0 is background and 1..K-1 are classes; voxels
    with weight 0 were never annotated and are ignored by every supervised term.
    """
    if labelled.target is None or labelled.weight is None:
        raise InvalidInputError("the labelled batch needs both target and weight, got None")
    expected = (labelled.image.shape[0], *labelled.image.shape[2:])
    for name, tensor in (("target", labelled.target), ("weight", labelled.weight)):
        if tuple(tensor.shape) != expected:
            raise InvalidInputError(
                f"labelled {name} must have shape {expected} (image without the channel "
                f"axis), got {tuple(tensor.shape)}"
            )


def joint_images(labelled: Batch, unlabelled: Batch) -> tuple[torch.Tensor, int]:
    """Concatenate labelled and unlabelled images along the batch axis (SSL4MIS style).

    Returns the joint (B_l + B_u, C, *spatial) tensor and B_l, so that outputs split as
    ``out[:B_l]`` (labelled) and ``out[B_l:]`` (unlabelled). One forward pass over both
    halves lets BatchNorm see both, as in the reference code.
    """
    check_labelled(labelled)
    if tuple(unlabelled.image.shape[1:]) != tuple(labelled.image.shape[1:]):
        raise InvalidInputError(
            f"unlabelled images must match labelled ones except in batch size, got "
            f"{tuple(unlabelled.image.shape)} and {tuple(labelled.image.shape)}"
        )
    return torch.cat([labelled.image, unlabelled.image]), labelled.image.shape[0]


def ramp(step: int, *, total: int, rampup_fraction: float, warmup_fraction: float = 0.0) -> float:
    """Consistency ramp in [0, 1]: 0 before ``warmup_fraction`` of the run, then sigmoid.

    The sigmoid ramp (:func:`sigmoid_rampup`) starts at step 0 and reaches 1 after
    ``rampup_fraction * total`` steps; the warm-up only forces it to 0 early on (the
    SSL4MIS mean teacher zeroes its consistency for the first 1000 iterations).
    """
    if step < warmup_fraction * total:
        return 0.0
    return sigmoid_rampup(step, rampup_fraction * total)


def check_fraction(name: str, value: float) -> None:
    """Raise unless a settings fraction lies in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_non_negative(name: str, value: float) -> None:
    """Raise unless a settings weight is >= 0."""
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
