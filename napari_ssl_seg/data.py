"""Labelled and unlabelled sampling from a project, as two-stream batches.

Label contract: on annotated voxels 0 is background and 1..K-1 are classes. Voxels no
human labelled get weight 0 (ignored) unless an earlier round's pseudo-label is confident
enough, in which case they get ``pseudo_weight``. Human voxels always weigh 1 and carry
the human label: no pseudo-label ever replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)
from scipy import ndimage as ndi

from napari_ssl_seg.config import TrainConfig
from napari_ssl_seg.errors import InvalidInputError
from napari_ssl_seg.methods.base import Batch
from napari_ssl_seg.store import Project


def normalisation(image, axis: int = 0, *, max_samples: int = 2_000_000) -> tuple[float, float]:
    """Robust intensity range (0.5 and 99.8 percentiles) of a strided voxel sample.

    At most 32 slices spread through the volume are read, each subsampled in-plane, so
    the sample covers the whole depth of a large volume without reading all of it.
    """
    n = image.shape[axis]
    picks = np.unique(np.linspace(0, n - 1, min(n, 32)).round().astype(int))
    plane = int(np.prod(image.shape)) // n
    stride = max(1, int(np.sqrt(len(picks) * plane / max_samples)))
    parts = []
    for i in picks:
        index: list = [slice(None, None, stride)] * 3
        index[axis] = int(i)
        parts.append(np.asarray(image[tuple(index)], np.float32).ravel())
    lo, hi = np.percentile(np.concatenate(parts), [0.5, 99.8])
    return float(lo), float(max(hi, lo + 1e-6))


def normalise(block: np.ndarray, norm: tuple[float, float]) -> np.ndarray:
    """Map intensities so that the robust range becomes [0, 1] (float32)."""
    lo, hi = norm
    return ((np.asarray(block, np.float32) - lo) / (hi - lo)).astype(np.float32)


#: Gaussian kernels are cut at this many sigmas (scipy's default is 4; 3 keeps 99.7 %).
SMOOTHING_TRUNCATE = 3.0


def smoothing_sigmas(width: float, project: Project) -> tuple[float, float]:
    """Gaussian sigmas (across slices, in-plane) for ``TrainConfig.smoothing`` = ``width``.

    ``width`` is in in-plane pixels; across slices it becomes the same physical extent
    where the voxel size is known (thick slices are barely smoothed across), else
    ``width`` slices. 0 turns smoothing off.
    """
    if width <= 0:
        return 0.0, 0.0
    return float(width * plane_to_slice_spacing(project)), float(width)


def plane_to_slice_spacing(project: Project) -> float:
    """Mean in-plane voxel size over the slice spacing (1 where the voxel size is unknown).

    A width of ``w`` in-plane pixels spans ``w * plane_to_slice_spacing(project)`` slices.
    """
    if project.voxel_size is None:
        return 1.0
    spacing = project.voxel_size[project.axis]
    plane = [v for i, v in enumerate(project.voxel_size) if i != project.axis]
    return float(np.mean(plane) / spacing)


def smoothing_halo(sigmas: tuple[float, float]) -> int:
    """Slices a block needs on each side so that its smoothed inner slices are exact."""
    return int(SMOOTHING_TRUNCATE * sigmas[0] + 0.5) if sigmas[0] > 0 else 0


def smooth(
    block: np.ndarray, sigmas: tuple[float, float], keep: slice | None = None
) -> np.ndarray:
    """Gaussian smoothing of a slice-first block, across slices and in-plane.

    The same as ``scipy.ndimage.gaussian_filter(block, (sigmas[0], sigmas[1],
    sigmas[1]), mode="nearest", truncate=SMOOTHING_TRUNCATE)``, but only the slices in
    ``keep`` are computed, so a block read with :func:`smoothing_halo` extra slices on
    each side costs one output buffer of the kept slices, and its kept slices equal
    those of the whole volume smoothed at once.

    Parameters
    ----------
    block : (S, H, W) float32 ndarray
    sigmas : (float, float)
        Across slices and in-plane, in slices and pixels; 0 skips that direction.
    keep : slice, optional
        Slices of ``block`` to return (default all).

    Returns
    -------
    (len(keep), H, W) float32 ndarray
    """
    keep = slice(None) if keep is None else keep
    across, plane = sigmas
    if across <= 0 and plane <= 0:
        return block[keep]
    wanted = np.arange(len(block))[keep]
    if across > 0:
        radius = smoothing_halo(sigmas)
        offsets = np.arange(-radius, radius + 1)
        weights = np.exp(-0.5 * (offsets / across) ** 2)
        weights /= weights.sum()
        out = np.zeros((len(wanted), *block.shape[1:]), np.float32)
        for offset, w in zip(offsets, weights, strict=True):
            out += np.float32(w) * block[np.clip(wanted + offset, 0, len(block) - 1)]
    else:
        out = block[keep].astype(np.float32, copy=True)
    if plane > 0:
        for j in range(len(out)):
            out[j] = ndi.gaussian_filter(
                out[j], plane, mode="nearest", truncate=SMOOTHING_TRUNCATE
            )
    return out


@dataclass
class TrainingSet:
    """The volume in slice-first order with targets and per-voxel weights.

    Attributes
    ----------
    image : (S, H, W) float32 ndarray
        Normalised image with the project's slice axis first, smoothed
        (``TrainConfig.smoothing``) as the network sees it.
    target : (S, H, W) int64 ndarray
        Human labels where known, else confident pseudo-labels, else 0.
    weight : (S, H, W) float32 ndarray
        1 on human voxels, ``pseudo_weight`` on confident pseudo-labelled ones, else 0.
    human_slices : list of int
        Slices holding human voxels.
    pseudo_slices : list of int
        Other slices with confident pseudo-labels.
    num_classes : int
        K, background included (at least 2).
    norm : (float, float)
        Intensity range used by :func:`normalise`.
    smoothing : (float, float)
        Gaussian sigmas (across slices, in-plane) ``image`` was smoothed with
        (:func:`smoothing_sigmas`); prediction smooths its input the same way.
    """

    image: np.ndarray
    target: np.ndarray
    weight: np.ndarray
    human_slices: list[int]
    pseudo_slices: list[int]
    num_classes: int
    norm: tuple[float, float]
    smoothing: tuple[float, float] = (0.0, 0.0)


def confident_pseudo_labels(
    pseudo: np.ndarray,
    confidence: np.ndarray,
    free: np.ndarray,
    threshold: float,
    class_share: float,
    *,
    max_samples: int = 2_000_000,
) -> np.ndarray:
    """Which pseudo-labels round r+1 learns from: confident ones, balanced per class.

    A voxel of ``free`` is kept where its confidence is at least ``threshold``, or at
    least the confidence of the ``class_share`` most confident voxels predicted as the
    same class (class-balanced self-training, Zou et al., ECCV 2018). With a few labelled
    slices the network is much less sure of the minority class than of the background:
    on the sample 5 % of the voxels it calls nucleus reach 0.9 against 95 % of the
    background, so a plain threshold teaches the next round almost only background.

    Parameters
    ----------
    pseudo : (S, H, W) integer ndarray
        The round's labels.
    confidence : (S, H, W) float ndarray
        Its confidence (max class probability).
    free : (S, H, W) bool ndarray
        Voxels no human labelled (the only ones a pseudo-label may fill).
    threshold : float
        Confidence that always suffices.
    class_share : float
        In [0, 1]; 0 keeps the threshold alone.
    max_samples : int
        Voxels per class used to estimate its quantile (strided sample of a large volume).

    Returns
    -------
    (S, H, W) bool ndarray
        True where the pseudo-label is used (never on a human voxel).
    """
    use = (confidence >= threshold) & free
    if class_share <= 0:
        return use
    for c in np.unique(pseudo[free]):
        in_class = (pseudo == c) & free
        values = confidence[in_class]
        values = values[:: max(1, values.size // max_samples)]
        floor = float(np.quantile(values, 1.0 - class_share))
        if floor < threshold:
            use |= in_class & (confidence >= floor)
    return use


def load_training_set(
    project: Project, config: TrainConfig, *, pseudo_round: int | None = None
) -> TrainingSet:
    """Read everything a round trains on from ``project``.

    Parameters
    ----------
    pseudo_round : int, optional
        Round whose confident pseudo-labels join the labelled set (default: the latest;
        0 = none).

    Raises
    ------
    InvalidInputError
        No voxel is annotated or corrected yet.
    """
    axis = project.axis
    norm = normalisation(project.image, axis)
    image = np.moveaxis(normalise(project.image[...], norm), axis, 0)
    smoothing = smoothing_sigmas(config.smoothing, project)
    image = smooth(image, smoothing)
    labels, human = project.human_labels()
    labels, human = np.moveaxis(labels, axis, 0), np.moveaxis(human, axis, 0)
    if not human.any():
        raise InvalidInputError(
            f"{project.path}: no slice is annotated yet; annotate at least one slice "
            "(an empty slice counts when marked as annotated background)"
        )
    target = labels.astype(np.int64)
    weight = human.astype(np.float32)
    pseudo_round = project.latest_round if pseudo_round is None else pseudo_round
    if pseudo_round >= 1 and config.pseudo_weight > 0:
        pseudo = np.moveaxis(np.asarray(project.pseudo_labels(pseudo_round)[...]), axis, 0)
        conf = np.moveaxis(np.asarray(project.confidence(pseudo_round)[...]), axis, 0)
        use = confident_pseudo_labels(
            pseudo, conf, ~human, config.pseudo_threshold, config.pseudo_class_share
        )
        target[use] = pseudo[use]
        weight[use] = config.pseudo_weight
    human_slices = [int(i) for i in np.flatnonzero(human.any(axis=(1, 2)))]
    has_weight = weight.any(axis=(1, 2))
    pseudo_slices = [int(i) for i in np.flatnonzero(has_weight) if i not in set(human_slices)]
    num_classes = max(2, int(labels[human].max()) + 1)
    return TrainingSet(
        image, target, weight, human_slices, pseudo_slices, num_classes, norm, smoothing
    )


def slice_stack(image: np.ndarray, indices: np.ndarray | list[int], mode: str) -> np.ndarray:
    """Network input for slices ``indices`` of a slice-first volume.

    Returns (B, C, H, W) float32: C = 1 in 2D, 3 in 2.5D (neighbours, clamped at the ends).
    """
    idx = np.asarray(indices)
    if mode == "2.5d":
        n = image.shape[0]
        chans = [image[np.clip(idx + d, 0, n - 1)] for d in (-1, 0, 1)]
        return np.stack(chans, axis=1)
    return image[idx][:, None]


def in_channels(mode: str) -> int:
    return 3 if mode == "2.5d" else 1


class TwoStreamSampler:
    """Draws labelled and unlabelled batches with MONAI augmentation, seeded.

    Labelled samples come from human slices, or (with probability
    ``1 - human_fraction`` once an earlier round exists) from pseudo-labelled slices.
    Unlabelled samples come from every slice. In 3D, cubes are cut around such slices.
    """

    def __init__(self, data: TrainingSet, config: TrainConfig) -> None:
        self.data = data
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.mode = config.mode
        spatial = 3 if config.mode == "3d" else 2
        if spatial == 2:
            size = [min(config.patch_size, n) for n in data.image.shape[1:]]
        else:
            cube = max(32, config.patch_size // 2)
            size = [min(cube, n) for n in data.image.shape]
        pad = [max(16, int(np.ceil(s / 16) * 16)) for s in size]
        keys = ["image", "target", "weight"]
        axes = [(0, 1)] if spatial == 2 else [(1, 2)]
        self.transform = Compose(
            [
                SpatialPadd(keys, spatial_size=pad),
                RandSpatialCropd(keys, roi_size=pad, random_size=False),
                RandFlipd(keys, prob=0.5, spatial_axis=spatial - 1),
                RandFlipd(keys, prob=0.5, spatial_axis=spatial - 2),
                RandRotate90d(keys, prob=0.5, spatial_axes=axes[0]),
                RandScaleIntensityd("image", factors=0.1, prob=0.5),
                RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            ]
        )
        self.transform.set_random_state(seed=config.seed)

    def _sample(self, index: int, labelled: bool) -> dict[str, np.ndarray]:
        d = self.data
        if self.mode == "3d":
            half = max(16, self.config.patch_size // 4)
            lo = max(0, min(index - half, d.image.shape[0] - 2 * half))
            sl = slice(lo, lo + 2 * half)
            item = {
                "image": d.image[sl][None],
                "target": d.target[sl][None],
                "weight": d.weight[sl][None],
            }
        else:
            item = {
                "image": slice_stack(d.image, [index], self.mode)[0],
                "target": d.target[index][None],
                "weight": d.weight[index][None],
            }
        if not labelled:
            item["weight"] = np.zeros_like(item["weight"])
        out = self.transform(item)
        return {k: np.asarray(v) for k, v in out.items()}

    def _batch(self, indices: list[int], labelled: bool) -> Batch:
        items = [self._sample(int(i), labelled) for i in indices]
        image = torch.from_numpy(np.stack([it["image"] for it in items]).astype(np.float32))
        target = torch.from_numpy(np.stack([it["target"][0] for it in items]).astype(np.int64))
        weight = torch.from_numpy(np.stack([it["weight"][0] for it in items]).astype(np.float32))
        return Batch(image, target, weight) if labelled else Batch(image)

    def labelled(self) -> Batch:
        d, n = self.data, self.config.labelled_batch
        if d.pseudo_slices:
            from_human = self.rng.random(n) < self.config.human_fraction
            picks = [
                self.rng.choice(d.human_slices) if h else self.rng.choice(d.pseudo_slices)
                for h in from_human
            ]
        else:
            picks = list(self.rng.choice(d.human_slices, size=n))
        return self._batch(picks, labelled=True)

    def unlabelled(self) -> Batch:
        n = max(1, self.config.unlabelled_batch)
        picks = list(self.rng.integers(0, self.data.image.shape[0], size=n))
        return self._batch(picks, labelled=False)


__all__ = [
    "TrainingSet",
    "confident_pseudo_labels",
    "TwoStreamSampler",
    "load_training_set",
    "normalisation",
    "normalise",
    "plane_to_slice_spacing",
    "smooth",
    "smoothing_halo",
    "smoothing_sigmas",
    "slice_stack",
    "in_channels",
]
