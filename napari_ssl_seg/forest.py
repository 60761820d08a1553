"""A pixel classifier on multiscale filter responses: the forest every round measures itself by.

The ilastik / APOC recipe: per pixel, the Gaussian-smoothed intensity, gradient magnitude
and Hessian eigenvalues of its slice at scales ``sigma_min``..``sigma_max``
(scikit-image ``multiscale_basic_features``), classified by a scikit-learn random forest
trained on the human-labelled pixels. It trains in seconds from a few slices and is hard
to beat where the classes differ in local intensity and texture, so a round validates the
network against it (and against their ensemble) and ships whichever scores best.

Label contract: on annotated voxels 0 is background and 1..K-1 are classes; voxels no
human labelled are never read as background (only the masked pixels train the forest).

Features are computed one slice at a time (a large slice strip by strip) and classified
in chunks, so predicting holds the features of at most ~2**20 pixels at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

#: The forest of the outside evaluation: 50 trees of depth <= 10 on sigma 1-16 features,
#: 20 000 stratified training pixels per annotated slice.
TREES = 50
DEPTH = 10
SIGMA_MIN = 1.0
SIGMA_MAX = 16.0
SAMPLES_PER_SLICE = 20_000
#: Pixels classified at once: sklearn holds one (n, K) float64 row per pixel and tree
#: worker, so a whole 2048^2 slice at once would hold 4M rows per worker.
PIXELS_PER_CHUNK = 2**18
#: Pixels of a slice whose features are made at once (a strip of a larger slice, plus
#: its halo): 2**20 float32 pixels x 20 features is 84 MB, twice that while skimage
#: stacks them.
FEATURE_STRIP_PIXELS = 2**20


def slice_features(
    plane: np.ndarray,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    workers: int = 1,
) -> np.ndarray:
    """Per-pixel features of one normalised slice (ilastik's generic filter bank).

    Parameters
    ----------
    plane : (Y, X) float ndarray
        Normalised intensities (:func:`napari_ssl_seg.data.normalise`).
    sigma_min, sigma_max : float
        Smallest and largest filter scale in pixels (0 < ``sigma_min`` <= ``sigma_max``).
    workers : int
        Threads computing the scales.

    Returns
    -------
    (Y, X, F) float32 ndarray
        Gaussian-smoothed intensity, gradient magnitude and two Hessian eigenvalues at
        ``log2(sigma_max / sigma_min) + 1`` scales (F = 20 for sigmas 1..16).
    """
    from skimage.feature import multiscale_basic_features

    plane = np.asarray(plane)
    if plane.ndim != 2 or plane.dtype.kind not in "biuf":
        raise ValueError(
            f"plane must be a 2D numeric array (Y, X), got shape {plane.shape} "
            f"and dtype {plane.dtype}"
        )
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(
            f"sigmas must satisfy 0 < sigma_min <= sigma_max, got {sigma_min} and {sigma_max}"
        )
    return multiscale_basic_features(
        plane.astype(np.float32, copy=False),
        intensity=True,
        edges=True,
        texture=True,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        workers=workers,
    ).astype(np.float32, copy=False)


def stratified_sample(
    labels: np.ndarray, n: int, rng: np.random.Generator, *, min_per_class: int = 100
) -> np.ndarray:
    """Indices of at most about ``n`` entries of ``labels`` (flat), each class in proportion.

    A class keeps at least ``min(count, min_per_class)`` entries, so a small class an
    annotator painted on purpose (a thin rim, a few tiny objects) is not lost.

    Parameters
    ----------
    labels : integer ndarray
        Class per entry (flattened).
    n : int
        Entries wanted in all (>= 1).
    rng : numpy.random.Generator

    Returns
    -------
    (m,) int64 ndarray
        Sorted flat indices; all of them when ``labels.size <= n``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    labels = np.ravel(labels)
    if labels.size <= n:
        return np.arange(labels.size)
    picks = []
    classes, counts = np.unique(labels, return_counts=True)
    for c, count in zip(classes, counts, strict=True):
        take = min(count, max(int(round(n * count / labels.size)), min_per_class))
        picks.append(rng.choice(np.flatnonzero(labels == c), size=take, replace=False))
    return np.sort(np.concatenate(picks))


@dataclass(frozen=True)
class ForestSettings:
    """How the forest is built (the defaults are the outside evaluation's forest)."""

    trees: int = TREES
    depth: int | None = DEPTH
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    samples_per_slice: int = SAMPLES_PER_SLICE

    def __post_init__(self) -> None:
        if self.trees < 1 or self.samples_per_slice < 1:
            raise ValueError(
                f"trees and samples_per_slice must be >= 1, got {self.trees} "
                f"and {self.samples_per_slice}"
            )
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"depth must be None or >= 1, got {self.depth!r}")
        if not 0 < self.sigma_min <= self.sigma_max:
            raise ValueError(
                "sigmas must satisfy 0 < sigma_min <= sigma_max, "
                f"got {self.sigma_min} and {self.sigma_max}"
            )


class PixelForest:
    """A random forest fitted on human-labelled pixels; predicts class probabilities.

    Build it with :func:`fit_forest`. ``num_classes`` is K (background included): the
    probabilities of classes the forest never saw are 0.
    """

    def __init__(self, forest, settings: ForestSettings, num_classes: int, n_jobs: int):
        self.forest = forest
        self.settings = settings
        self.num_classes = num_classes
        self.n_jobs = n_jobs

    def features(self, plane: np.ndarray) -> np.ndarray:
        """:func:`slice_features` of ``plane`` with this forest's scales."""
        s = self.settings
        return slice_features(
            plane, sigma_min=s.sigma_min, sigma_max=s.sigma_max, workers=self.n_jobs
        )

    def probabilities_of_features(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities of feature rows.

        Parameters
        ----------
        features : (..., F) float32 ndarray

        Returns
        -------
        (..., K) float32 ndarray
        """
        flat = features.reshape(-1, features.shape[-1])
        out = np.zeros((len(flat), self.num_classes), np.float32)
        columns = self.forest.classes_.astype(int)
        for start in range(0, len(flat), PIXELS_PER_CHUNK):
            part = flat[start : start + PIXELS_PER_CHUNK]
            out[start : start + len(part), columns] = self.forest.predict_proba(part)
        return out.reshape(*features.shape[:-1], self.num_classes)

    def predict_proba(
        self, planes: np.ndarray, *, strip_pixels: int = FEATURE_STRIP_PIXELS
    ) -> np.ndarray:
        """Class probabilities of normalised slices, one slice's features at a time.

        A slice of more than ``strip_pixels`` pixels is done in strips of rows, each
        with the filters' reach of extra rows on both sides (:meth:`halo`), so its
        probabilities are those of the whole slice while its features never are all in
        memory at once (a 2048^2 slice's take 670 MB as skimage makes them).

        Parameters
        ----------
        planes : (S, H, W) float32 ndarray
        strip_pixels : int
            Largest number of pixels whose features are made at once (plus the halo).

        Returns
        -------
        (S, K, H, W) float32 ndarray
        """
        planes = np.asarray(planes)
        if planes.ndim != 3:
            raise ValueError(f"planes must be (S, H, W), got shape {planes.shape}")
        height, width = planes.shape[1:]
        rows = height if height * width <= strip_pixels else max(1, strip_pixels // width)
        halo = self.halo()
        out = np.empty((len(planes), self.num_classes, height, width), np.float32)
        for j, plane in enumerate(planes):
            for start in range(0, height, rows):
                stop = min(height, start + rows)
                lo, hi = max(0, start - halo), min(height, stop + halo)
                probs = self.probabilities_of_features(self.features(plane[lo:hi]))
                out[j, :, start:stop] = np.moveaxis(probs[start - lo : stop - lo], -1, 0)
        return out

    def halo(self) -> int:
        """Rows beyond a strip that its features read: the largest Gaussian's radius
        (scikit-image truncates at 4 sigmas) plus the Sobel and Hessian differences."""
        return int(4.0 * self.settings.sigma_max + 0.5) + 4


def fit_forest(
    planes: Iterable[np.ndarray],
    labels: Iterable[np.ndarray],
    masks: Iterable[np.ndarray],
    *,
    num_classes: int,
    settings: ForestSettings | None = None,
    n_jobs: int = 1,
    seed: int = 0,
) -> PixelForest:
    """Fit a :class:`PixelForest` on the masked pixels of some slices.

    Parameters
    ----------
    planes : iterable of (H, W) float32 ndarrays
        Normalised slices (one at a time is in memory with its features).
    labels : iterable of (H, W) integer ndarrays
        Label contract: on masked pixels 0 is background and 1..K-1 are classes; what
        unmasked pixels hold is never read.
    masks : iterable of (H, W) bool ndarrays
        The pixels to learn from (human-labelled and not held out for validation).
    num_classes : int
        K, background included (>= 2).
    settings : ForestSettings, optional
    n_jobs : int
        Threads of the filters and of the forest.
    seed : int
        Seeds the pixel sample and the forest.

    Returns
    -------
    PixelForest

    Raises
    ------
    ValueError
        No pixel is masked, shapes disagree, or a label is outside 0..K-1.
    """
    from sklearn.ensemble import RandomForestClassifier

    settings = settings or ForestSettings()
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    rng = np.random.default_rng(seed)
    x_parts, y_parts = [], []
    probe = PixelForest(None, settings, num_classes, n_jobs)
    for plane, lab, mask in zip(planes, labels, masks, strict=True):
        lab, mask = np.asarray(lab), np.asarray(mask, bool)
        if not (np.shape(plane) == lab.shape == mask.shape):
            raise ValueError(
                "plane, labels and mask must have one shape, got "
                f"{np.shape(plane)}, {lab.shape} and {mask.shape}"
            )
        if not mask.any():
            continue
        known = lab[mask]
        if known.min() < 0 or known.max() >= num_classes:
            raise ValueError(
                f"labels must lie in 0..{num_classes - 1} on masked pixels, "
                f"got {known.min()}..{known.max()}"
            )
        pick = stratified_sample(known, settings.samples_per_slice, rng)
        x_parts.append(probe.features(plane)[mask][pick])
        y_parts.append(known[pick])
    if not x_parts:
        raise ValueError("no masked pixel to fit the forest on")
    forest = RandomForestClassifier(
        n_estimators=settings.trees, max_depth=settings.depth, n_jobs=n_jobs, random_state=seed
    )
    with warnings.catch_warnings():
        # Many classes with a few pixels each are still classes (label contract), not
        # the regression target sklearn's heuristic suspects.
        warnings.filterwarnings("ignore", message="The number of unique classes is greater")
        forest.fit(np.concatenate(x_parts), np.concatenate(y_parts))
    return PixelForest(forest, settings, num_classes, n_jobs)


def fit_forest_on_slices(
    image,
    labels,
    slices: Sequence[int],
    **kwargs,
) -> PixelForest:
    """:func:`fit_forest` on whole slices ``slices`` of a slice-first volume.

    ``image`` (S, H, W) normalised, ``labels`` (S, H, W) integers: every pixel of those
    slices is labelled (0 = background). Other arguments as :func:`fit_forest`.
    """
    slices = [int(z) for z in slices]
    return fit_forest(
        (np.asarray(image[z], np.float32) for z in slices),
        (np.asarray(labels[z]) for z in slices),
        (np.ones(np.shape(labels[z]), bool) for z in slices),
        **kwargs,
    )


__all__ = [
    "ForestSettings",
    "PixelForest",
    "fit_forest",
    "fit_forest_on_slices",
    "slice_features",
    "stratified_sample",
]
