"""Loss pieces shared by the methods: weighted CE + Dice, ramps, signed distance maps.

Label contract: on annotated voxels 0 is background and 1..K-1 are classes; voxels with
weight 0 were never annotated and take no part in any supervised loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def sigmoid_rampup(step: float, length: float) -> float:
    """Laine & Aila ramp: exp(-5 (1 - t/L)^2), reaching 1 at ``step >= length``.

    SSL4MIS calls it with ``iteration // 150`` and L = 40 (DTC, DTML) or 200 (MT);
    we pass iterations directly and a length that is a fraction of the run.
    """
    if length <= 0:
        return 1.0
    t = min(max(float(step), 0.0), float(length)) / float(length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(step: float, length: float) -> float:
    """Linear ramp min(t/L, 1) clipped at 0 (SSL4MIS ``linear_rampup``); 1 when L <= 0."""
    if length <= 0:
        return 1.0
    return min(max(float(step), 0.0), float(length)) / float(length)


def weighted_ce_dice(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-5
) -> torch.Tensor:
    """0.5 (CE + Dice) over voxels with non-zero weight (the SSL4MIS supervised loss).

    Parameters
    ----------
    logits : (B, K, *spatial) float tensor
    target : (B, *spatial) int64 tensor
        Class per voxel (0 = background on annotated voxels).
    weight : (B, *spatial) float tensor
        Per-voxel weight; 0 ignores a voxel (not annotated).

    Returns
    -------
    0-d tensor
        Zero (with a gradient path) when no voxel has weight.
    """
    total = weight.sum()
    if total <= 0:
        return logits.sum() * 0.0
    ce = (F.cross_entropy(logits, target, reduction="none") * weight).sum() / total
    return 0.5 * (ce + soft_dice_loss(logits.softmax(1), target, weight, eps=eps))


def soft_dice_loss(
    probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-5
) -> torch.Tensor:
    """Multi-class soft Dice 1 - (2 sum(p s) + eps) / (sum(p^2) + sum(s^2) + eps).

    Averaged over all K classes, background included (SSL4MIS ``DiceLoss``), each voxel
    weighted by ``weight``. ``probs`` is (B, K, *spatial); ``target`` (B, *spatial) int64.
    """
    num_classes = probs.shape[1]
    onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).to(probs.dtype)
    w = weight.unsqueeze(1)
    dims = [0] + list(range(2, probs.ndim))
    inter = (probs * onehot * w).sum(dims)
    denom = (probs * probs * w).sum(dims) + (onehot * w).sum(dims)
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def compute_sdf(target: np.ndarray, num_classes: int) -> np.ndarray:
    """Normalised signed distance map per foreground class (DTC ``compute_sdf``).

    Parameters
    ----------
    target : (B, *spatial) int ndarray
        Class per voxel.
    num_classes : int
        K, background included.

    Returns
    -------
    (B, K-1, *spatial) float32 ndarray
        For each sample and class c >= 1: negative inside, positive outside, in [-1, 1],
        0 on the inner boundary; all zeros where the class is absent (or fills the map).
    """
    out = np.zeros((target.shape[0], num_classes - 1) + target.shape[1:], np.float32)
    for b in range(target.shape[0]):
        for c in range(1, num_classes):
            fg = target[b] == c
            if not fg.any() or fg.all():
                continue
            posdis = ndimage.distance_transform_edt(fg)
            negdis = ndimage.distance_transform_edt(~fg)
            boundary = fg & ~ndimage.binary_erosion(fg)
            sdf = negdis / max(negdis.max(), 1e-8) - posdis / max(posdis.max(), 1e-8)
            sdf[boundary] = 0.0
            out[b, c - 1] = sdf
    return out


def sdf_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """:func:`compute_sdf` for a tensor, returned on the tensor's device."""
    sdf = compute_sdf(target.detach().cpu().numpy(), num_classes)
    return torch.from_numpy(sdf).to(target.device)


# --- helpers of the distance-map methods (DTC, DTML, SimCVD) -----------------------------


def heaviside(sdf: torch.Tensor, k: float) -> torch.Tensor:
    """Smooth Heaviside sigmoid(-k sdf) of DTC: about 1 inside an object, 0 outside.

    The signed distance is negative inside, so the sign flip maps inside to 1. DTC uses
    k = 1500, a near step; a smaller k widens the band where the transform has a gradient.
    """
    return torch.sigmoid(-k * sdf)


def masked_sdf_targets(
    target: torch.Tensor, weight: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Signed distance targets built from the annotated voxels only.

    Parameters
    ----------
    target : (B, *spatial) int64 tensor
        Class per voxel (0 = background on annotated voxels).
    weight : (B, *spatial) float tensor
        Voxels with weight 0 are unannotated; their ``target`` is never read.
    num_classes : int
        K, background included.

    Returns
    -------
    (B, K-1, *spatial) float32 tensor on ``target``'s device
        :func:`compute_sdf` of the target with unannotated voxels counted as outside every
        class (so unannotated voxels cannot change the map). Unlike DTC, a class absent
        from a sample gets +1 everywhere (all outside) instead of 0, and a class filling
        it gets -1: with 2D slices, many of which lack a class, a 0 target would teach
        ``heaviside(0) = 0.5`` ("maybe") on every empty slice.
    """
    known = torch.where(weight > 0, target, torch.zeros_like(target))
    sdf = sdf_targets(known, num_classes)
    dims = tuple(range(1, known.ndim))
    for c in range(1, num_classes):
        count = (known == c).sum(dims)
        sdf[count == 0, c - 1] = 1.0
        sdf[count == known[0].numel(), c - 1] = -1.0
    return sdf


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared error over voxels with non-zero weight, averaged over channels.

    ``pred`` and ``target`` are (B, C, *spatial); ``weight`` is (B, *spatial). Zero (with a
    gradient path) when no voxel has weight.
    """
    total = weight.sum() * pred.shape[1]
    if total <= 0:
        return pred.sum() * 0.0
    return (((pred - target) ** 2) * weight.unsqueeze(1)).sum() / total


def weighted_dice_loss(
    probs: torch.Tensor, onehot: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-5
) -> torch.Tensor:
    """Soft Dice loss per channel, averaged, over voxels weighted by ``weight``.

    Same formula as :func:`soft_dice_loss` but for any channels (e.g. the foreground
    classes only). ``probs`` and ``onehot`` are (B, C, *spatial) in [0, 1]; ``weight`` is
    (B, *spatial). Zero (with a gradient path) when no voxel has weight.
    """
    if weight.sum() <= 0:
        return probs.sum() * 0.0
    w = weight.unsqueeze(1)
    dims = [0] + list(range(2, probs.ndim))
    inter = (probs * onehot * w).sum(dims)
    denom = (probs * probs * w).sum(dims) + (onehot * onehot * w).sum(dims)
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def foreground_onehot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot of classes 1..K-1: (B, *spatial) int64 -> (B, K-1, *spatial) float32."""
    onehot = F.one_hot(target.long().clamp(0, num_classes - 1), num_classes)
    return onehot.movedim(-1, 1)[:, 1:].float()


def foreground_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax probability of classes 1..K-1: (B, K, *spatial) -> (B, K-1, *spatial)."""
    return logits.softmax(1)[:, 1:]
