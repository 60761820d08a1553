"""Baselines the SSL methods are measured against: an ilastik-style random forest and Otsu.

``random_forest_segment`` is the pixel classifier of ilastik / APOC: a random forest on
generic per-pixel filter responses (smoothed intensity, edges, texture at several
scales), trained on the annotated slices and applied to every slice. ``otsu_segment`` is
the global threshold a user would try first. Both normalise the image as the engine does
(:func:`napari_ssl_seg.data.normalisation`), so they see the same intensities.

    python benchmarks/baselines.py                # both on the clean sample, 3 slices
    python benchmarks/baselines.py --noisy --slices 1

scikit-learn comes with the package (the forest is :mod:`napari_ssl_seg.forest`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from napari_ssl_seg.data import normalisation, normalise
from napari_ssl_seg.forest import ForestSettings, fit_forest_on_slices


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.dtype.kind not in "biuf":
        raise ValueError(
            "image must be a 3D numeric array (Z, Y, X), "
            f"got shape {image.shape} and dtype {image.dtype}"
        )
    return image


def random_forest_segment(
    image,
    labels,
    annotated_slices: Sequence[int],
    *,
    n_estimators: int = 50,
    n_jobs: int = 2,
    seed: int = 0,
    samples_per_slice: int = 20_000,
    sigma_min: float = 1.0,
    sigma_max: float = 16.0,
    max_depth: int | None = None,
) -> tuple[np.ndarray, float]:
    """Segment ``image`` with a random forest trained on the annotated slices.

    Parameters
    ----------
    image : (Z, Y, X) numeric ndarray
        Slices along axis 0.
    labels : (Z, Y, X) integer ndarray
        Label contract: on annotated slices 0 is background and 1..K are classes; only
        ``annotated_slices`` are read, so what the other slices hold does not matter.
    annotated_slices : sequence of int
        Indices along axis 0 (at least one).
    n_estimators, n_jobs, seed
        Of the ``RandomForestClassifier`` (``n_jobs`` also runs the filters in parallel).
    samples_per_slice : int
        Training pixels drawn per annotated slice, stratified by class.
    sigma_min, sigma_max : float
        Smallest and largest filter scale in pixels.
    max_depth : int, optional
        Of the trees (None: grown until their leaves are pure).

    Returns
    -------
    labels : (Z, Y, X) uint8 ndarray
        The predicted class of every voxel.
    seconds : float
        Wall time of normalisation, features, fitting and prediction.
    """
    image = _check_image(image)
    labels = np.asarray(labels)
    if labels.shape != image.shape or labels.dtype.kind not in "biu":
        raise ValueError(
            f"labels must be integers of the image's shape {image.shape}, "
            f"got shape {labels.shape} and dtype {labels.dtype}"
        )
    slices = [int(z) for z in annotated_slices]
    if not slices or any(not 0 <= z < image.shape[0] for z in slices):
        raise ValueError(
            f"annotated_slices must be 1 or more indices in 0..{image.shape[0] - 1}, "
            f"got {list(annotated_slices)}"
        )
    settings = ForestSettings(  # checks the forest's arguments
        trees=n_estimators,
        depth=max_depth,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        samples_per_slice=samples_per_slice,
    )
    started = time.perf_counter()
    volume = normalise(image, normalisation(image, 0))
    num_classes = max(2, int(max(labels[z].max() for z in slices)) + 1)
    forest = fit_forest_on_slices(
        volume,
        labels,
        slices,
        num_classes=num_classes,
        settings=settings,
        n_jobs=n_jobs,
        seed=seed,
    )
    out = np.empty(image.shape, np.uint8)
    for z in range(image.shape[0]):
        out[z] = forest.predict_proba(volume[z : z + 1])[0].argmax(0)
    return out, time.perf_counter() - started


def otsu_segment(image, *, sigma: float = 1.0) -> tuple[np.ndarray, float]:
    """Foreground where the blurred, normalised image exceeds its global Otsu threshold.

    Parameters
    ----------
    image : (Z, Y, X) numeric ndarray
    sigma : float
        Of the 3D Gaussian blur applied first (0 = none).

    Returns
    -------
    labels : (Z, Y, X) uint8 ndarray
        1 = foreground, 0 = background.
    seconds : float
        Wall time.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.filters import threshold_otsu

    image = _check_image(image)
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    started = time.perf_counter()
    volume = normalise(image, normalisation(image, 0))
    if sigma > 0:
        volume = gaussian_filter(volume, sigma)
    out = (volume > threshold_otsu(volume)).astype(np.uint8)
    return out, time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> None:
    from _common import load_variant, unannotated_dice

    from napari_ssl_seg._sample_data import quickstart_slices

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noisy", action="store_true", help="the low-photon variant")
    parser.add_argument("--slices", type=int, default=3, help="annotated slices (evenly spaced)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-jobs", type=int, default=2)
    args = parser.parse_args(argv)

    image, truth = load_variant("noisy" if args.noisy else "clean", args.seed)
    slices = quickstart_slices(args.slices)
    rf, rf_seconds = random_forest_segment(
        image, truth, slices, n_jobs=args.n_jobs, seed=args.seed
    )
    otsu, otsu_seconds = otsu_segment(image)
    for name, pred, seconds in (("random forest", rf, rf_seconds), ("otsu", otsu, otsu_seconds)):
        print(
            f"{name:14s} Dice {unannotated_dice(pred, truth, slices):.4f} on the slices other "
            f"than {slices}, {seconds:.1f} s"
        )


if __name__ == "__main__":
    main()
