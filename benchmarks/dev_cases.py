"""The development suite's cases: tasks made from the bundled nuclei sample alone.

Every default of the engine was first chosen on the sample, whose Otsu threshold already
scores 0.966. Each case here keeps the sample's image and truth but stresses one thing
the sample does not: a thin class, a tiny target on few slices, a bias field with Rician
noise, thick slices, annotation along another axis, inverted contrast, one annotated
slice. Only the bundled sample is used: volumes from other packages are what the outside
evaluation draws on, and a default tuned on them would prove nothing there.

The cases depend on nothing of the engine (only on the sample files and their loader),
so a change of a default can never change what it is scored on. Every case is
deterministic for a given seed (the seed draws the noise, and the bias field of its case).

    from dev_cases import CASES, make_case
    case = make_case("thin-rim-3", seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

#: Foreground budget of the tiny-object task: the smallest nuclei are kept while their
#: voxels stay under this fraction of the volume.
TINY_FRACTION = 0.005
#: Width in pixels of the rim class of the thin-class task (an inner boundary band).
RIM_WIDTH = 2
#: The bias field spans this range of gains (a smooth multiplicative field).
BIAS_RANGE = (0.4, 1.6)
#: Rician noise sigma as a fraction of the biased image's 99th intensity percentile.
RICIAN_SIGMA = 0.15
#: Keep every n-th slice for the anisotropic case.
ANISOTROPY = 3


@dataclass
class Case:
    """One task of the suite.

    Attributes
    ----------
    name : str
    image : (Z, Y, X) uint16 ndarray
    truth : (Z, Y, X) uint8 ndarray
        Every voxel labelled: 0 background, 1..K classes.
    annotated : list of int
        The slices (along ``axis``) a human labels; every other slice is scored, empty
        ones included.
    axis : int
        The slice axis the annotator works along (``init --axis``).
    voxel_size : tuple of 3 floats
        (z, y, x) in micrometre.
    what : str
        One line saying what the case stresses.
    """

    name: str
    image: np.ndarray
    truth: np.ndarray
    annotated: list[int]
    axis: int = 0
    voxel_size: tuple[float, float, float] = (0.29, 0.26, 0.26)
    what: str = ""
    classes: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.classes = [int(c) for c in np.unique(self.truth) if c != 0]


# ------------------------------------------------------------------------ transforms
def evenly_spaced_slices(truth: np.ndarray, n: int, *, axis: int = 0) -> list[int]:
    """``n`` slices evenly spaced among those (along ``axis``) holding every class of truth.

    The slices holding all foreground classes are cut into ``n`` equal bins and the
    centre one of each bin is taken (as ``quickstart_slices`` does over the whole stack).
    """
    truth = np.moveaxis(np.asarray(truth), axis, 0)
    classes = [c for c in np.unique(truth) if c != 0]
    holds = np.ones(truth.shape[0], bool)
    for c in classes:
        holds &= (truth == c).any(axis=(1, 2))
    candidates = np.flatnonzero(holds)
    if not 1 <= n <= len(candidates):
        raise ValueError(
            f"n must be in 1..{len(candidates)} (slices holding every class), got {n}"
        )
    m = len(candidates)
    return [int(candidates[(2 * i + 1) * m // (2 * n)]) for i in range(n)]


def rim_classes(truth: np.ndarray, width: int = RIM_WIDTH) -> np.ndarray:
    """Interior 1, an inner boundary band ``width`` pixels wide 2, background 0.

    The band is what a per-slice erosion (4-connected, ``width`` times) removes; an
    object cut by the image edge gets no band along the edge.
    """
    fg = np.asarray(truth) > 0
    out = fg.astype(np.uint8)
    for z in range(fg.shape[0]):
        inner = ndimage.binary_erosion(fg[z], iterations=width, border_value=1)
        out[z][fg[z] & ~inner] = 2
    return out


def smallest_objects(instances: np.ndarray, fraction: float = TINY_FRACTION) -> np.ndarray:
    """Binary truth of the smallest instances whose voxels stay under ``fraction``."""
    ids, counts = np.unique(instances[instances > 0], return_counts=True)
    keep, total = [], 0
    for i in np.argsort(counts, kind="stable"):
        if total + counts[i] >= fraction * instances.size:
            break
        keep.append(ids[i])
        total += counts[i]
    return np.isin(instances, keep).astype(np.uint8)


def bias_field(shape: tuple[int, int, int], seed: int, span=BIAS_RANGE) -> np.ndarray:
    """A smooth multiplicative field: a random 2nd-order polynomial scaled into ``span``."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    terms = [z, y, x, z * y, z * x, y * x, z * z, y * y, x * x]
    poly = sum(c * t for c, t in zip(rng.uniform(-1, 1, len(terms)), terms, strict=True))
    poly = (poly - poly.min()) / (poly.max() - poly.min())
    return (span[0] + (span[1] - span[0]) * poly).astype(np.float32)


def rician(signal: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """|signal + n1 + i n2| with n1, n2 ~ N(0, sigma): the noise of a magnitude image."""
    rng = np.random.default_rng(seed)
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imag = rng.normal(0.0, sigma, signal.shape)
    return np.hypot(real, imag)


def to_uint16(values: np.ndarray) -> np.ndarray:
    """Scale non-negative values so that the largest is 65535; round to uint16."""
    values = np.asarray(values, np.float64)
    return np.rint(values * (65535.0 / max(values.max(), 1e-12))).astype(np.uint16)


def invert(image: np.ndarray) -> np.ndarray:
    """Dark objects on a bright background, the same intensity range."""
    lo, hi = int(image.min()), int(image.max())
    return (hi + lo - image.astype(np.int64)).astype(image.dtype)


# ------------------------------------------------------------------------------ cases
def _sample(seed: int, noisy: bool = False):
    from napari_ssl_seg._sample_data import (
        NUCLEI_LABELS,
        load_nuclei,
        noisy_nuclei,
    )
    from napari_ssl_seg.io import read_volume

    image, truth, voxel_size = load_nuclei()
    if noisy:
        image = noisy_nuclei(seed=seed)
    instances = read_volume(NUCLEI_LABELS).data
    return image, truth, instances, voxel_size


def _nuclei(name, seed, *, noisy=False, slices=3, what=""):
    image, truth, _, voxel = _sample(seed, noisy)
    return Case(name, image, truth, evenly_spaced_slices(truth, slices), 0, voxel, what)


def _thin_rim(name, seed):
    image, truth, _, voxel = _sample(seed)
    truth = rim_classes(truth)
    what = f"3 classes: nucleus interior, a {RIM_WIDTH}-pixel inner rim, background"
    return Case(name, image, truth, evenly_spaced_slices(truth, 3), 0, voxel, what)


def _tiny(name, seed):
    image, _, instances, voxel = _sample(seed)
    truth = smallest_objects(instances)
    what = (
        f"only the smallest nuclei ({100 * truth.mean():.2f} % of voxels, on "
        f"{int(truth.any(axis=(1, 2)).sum())} of {truth.shape[0]} slices); empty slices scored"
    )
    return Case(name, image, truth, evenly_spaced_slices(truth, 2), 0, voxel, what)


def _bias_rician(name, seed):
    image, truth, _, voxel = _sample(seed)
    biased = image.astype(np.float64) * bias_field(image.shape, seed)
    noisy = rician(biased, RICIAN_SIGMA * np.percentile(biased, 99), seed)
    what = (
        f"a smooth bias field x{BIAS_RANGE[0]}..x{BIAS_RANGE[1]} and Rician noise "
        f"(sigma {RICIAN_SIGMA:g} x the 99th percentile)"
    )
    return Case(name, to_uint16(noisy), truth, evenly_spaced_slices(truth, 3), 0, voxel, what)


def _anisotropic(name, seed):
    image, truth, _, voxel = _sample(seed)
    image, truth = image[::ANISOTROPY].copy(), truth[::ANISOTROPY].copy()
    voxel = (round(voxel[0] * ANISOTROPY, 6), voxel[1], voxel[2])
    what = f"one slice in {ANISOTROPY} kept: voxel size {voxel}"
    return Case(name, image, truth, evenly_spaced_slices(truth, 3), 0, voxel, what)


def _other_axis(name, seed, axis=2):
    image, truth, _, voxel = _sample(seed)
    slices = evenly_spaced_slices(truth, 3, axis=axis)
    return Case(name, image, truth, slices, axis, voxel, f"annotated along axis {axis}")


def _inverted(name, seed):
    image, truth, _, voxel = _sample(seed)
    what = "inverted contrast: dark nuclei on a bright background"
    return Case(name, invert(image), truth, evenly_spaced_slices(truth, 3), 0, voxel, what)


#: name -> builder(name, seed). The number at the end is the annotated slice count.
CASES = {
    "sample-3": lambda n, s: _nuclei(n, s, what="the sample"),
    "sample-1": lambda n, s: _nuclei(n, s, slices=1, what="the sample, one slice"),
    "noisy-3": lambda n, s: _nuclei(n, s, noisy=True, what="the sample's low-photon variant"),
    "noisy-1": lambda n, s: _nuclei(n, s, noisy=True, slices=1, what="low-photon, one slice"),
    "thin-rim-3": _thin_rim,
    "tiny-2": _tiny,
    "bias-rician-3": _bias_rician,
    "anisotropic-3": _anisotropic,
    "axis2-3": _other_axis,
    "inverted-3": _inverted,
}


def make_case(name: str, seed: int = 0) -> Case:
    """Build the case ``name`` (a key of :data:`CASES`); ``seed`` draws its noise and bias."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; allowed: {list(CASES)}")
    return CASES[name](name, int(seed))
