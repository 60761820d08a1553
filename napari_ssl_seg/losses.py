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

    For a fully known label map. Training uses :func:`masked_sdf_targets`, which also
    knows which voxels were annotated and where the crop ends.

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
        The inner boundary is a voxel of c with a voxel of another class next to it along
        an axis (DTC: ``find_boundaries(mode="inner")``); the crop edge is not a boundary.
    """
    out = np.zeros((target.shape[0], num_classes - 1) + target.shape[1:], np.float32)
    for b in range(target.shape[0]):
        for c in range(1, num_classes):
            fg = target[b] == c
            if not fg.any() or fg.all():
                continue
            posdis = ndimage.distance_transform_edt(fg)
            negdis = ndimage.distance_transform_edt(~fg)
            sdf = negdis / negdis.max() - posdis / posdis.max()
            sdf[posdis == 1] = 0.0  # an axis neighbour is outside: the inner boundary
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


def _distance_to(voxels: np.ndarray) -> np.ndarray:
    """Euclidean distance of every voxel to the nearest True voxel; inf where there is none."""
    if not voxels.any():
        return np.full(voxels.shape, np.inf)
    return ndimage.distance_transform_edt(~voxels)


def masked_sdf_targets(
    target: torch.Tensor, weight: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed distance targets of the annotated voxels, and where they can be trusted.

    The distance of an annotated voxel of class c to the nearest annotated voxel of
    another class (or, outside c, to the nearest annotated voxel of c) is the true one
    only when no unannotated voxel is nearer: that voxel could be of either class. The
    space beyond the crop edge is unannotated too. Where an unannotated voxel is nearer,
    the target is left out (its loss weight is 0), so a correction box inside an object
    gets no boundary at the box edge, and an object cut by the crop edge no boundary there.

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
    sdf : (B, K-1, *spatial) float32 tensor on ``target``'s device
        :func:`compute_sdf`'s values where the loss weight is non-zero: negative inside,
        positive outside, 0 on the inner boundary; each side divided by its largest
        distance among the annotated voxels (DTC divides by the largest in the map). 0
        elsewhere.
    loss_weight : (B, K-1, *spatial) float32 tensor on ``target``'s device
        ``weight`` where the target is decided by annotated voxels alone, 0 elsewhere. A
        class with no annotated voxel in a sample (or no annotated voxel outside it) has
        no trusted distance there; DTC's all-zero map would teach "boundary everywhere".
    """
    known = (weight > 0).cpu().numpy()
    labels = target.detach().cpu().numpy()
    shape = (labels.shape[0], num_classes - 1) + labels.shape[1:]
    sdf = np.zeros(shape, np.float32)
    trusted = np.zeros(shape, bool)
    for b in range(labels.shape[0]):
        # distance to the nearest unannotated voxel, the ring just beyond the crop included
        beyond = np.pad(~known[b], 1, constant_values=True)
        to_unknown = _distance_to(beyond)[(slice(1, -1),) * known[b].ndim]
        for c in range(1, num_classes):
            inside = known[b] & (labels[b] == c)
            outside = known[b] & (labels[b] != c)
            posdis = _distance_to(outside)  # read on inside voxels
            negdis = _distance_to(inside)  # read on outside voxels
            ok_in = inside & (posdis <= to_unknown)
            ok_out = outside & (negdis <= to_unknown)
            if ok_in.any():
                sdf[b, c - 1][ok_in] = -posdis[ok_in] / posdis[inside].max()
                sdf[b, c - 1][ok_in & (posdis == 1)] = 0.0  # the inner boundary
            if ok_out.any():
                sdf[b, c - 1][ok_out] = negdis[ok_out] / negdis[outside].max()
            trusted[b, c - 1] = ok_in | ok_out
    loss_weight = torch.from_numpy(trusted).to(weight.device, weight.dtype)
    loss_weight = loss_weight * weight.unsqueeze(1)
    return torch.from_numpy(sdf).to(target.device), loss_weight


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared error: sum(w (pred - target)^2) / sum(w) over voxels and channels.

    ``pred`` and ``target`` are (B, C, *spatial); ``weight`` is (B, *spatial) (the same for
    every channel) or (B, C, *spatial). Zero (with a gradient path) when no voxel has weight.
    """
    if weight.ndim == pred.ndim - 1:
        weight = weight.unsqueeze(1).expand_as(pred)
    total = weight.sum()
    if total <= 0:
        return pred.sum() * 0.0
    return (((pred - target) ** 2) * weight).sum() / total


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
