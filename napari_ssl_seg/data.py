"""Labelled and unlabelled sampling from a project, as two-stream batches.

Label contract: on annotated voxels 0 is background and 1..K-1 are classes. Voxels no
human labelled get weight 0 (ignored) unless an earlier round's pseudo-label is confident
enough, in which case they get ``pseudo_weight``. Human voxels always weigh 1 and carry
the human label: no pseudo-label ever replaces them. Human voxels held out for
validation weigh 0, carry target 0 and take no pseudo-label: no loss ever sees them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
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
from napari_ssl_seg.store import Project, iter_slabs
from napari_ssl_seg.validation import holdout_bands


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
    """Map intensities so that the robust range becomes [0, 1] (float32).

    Works in one float32 copy of ``block`` (never in ``block`` itself): the expression
    ``(x - lo) / (hi - lo)`` held three, ~430 MB for the 9 slices of 2048^2 a predicted
    slice reads with its smoothing halo (the step's peak in big_volume_memory).
    """
    lo, hi = norm
    out = np.array(block, np.float32, copy=True)
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    return out


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
    """What a round trains on, in slice-first order, read slice by slice on demand.

    ``image``, ``target`` and ``weight`` are :class:`SliceArray` views: indexing one with
    an int, a slice or a list of slice indices reads just those slices from the project
    (and keeps recently used ones in a bounded cache), so a volume larger than memory can
    be trained on. ``np.asarray(view)`` reads the whole volume (for small volumes and
    tests). The human labels are read once, when the set is made, so strokes painted
    while a round trains do not leak into it.

    Attributes
    ----------
    image : (S, H, W) float32 SliceArray
        Normalised image with the project's slice axis first, smoothed
        (``TrainConfig.smoothing``) as the network sees it.
    target : (S, H, W) int32 SliceArray
        Human labels where known, else confident pseudo-labels, else 0.
    weight : (S, H, W) float32 SliceArray
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
    windowed : bool
        The prepared slices are larger than the cache: :meth:`window` then reads crops
        from the project window by window instead of cutting them from whole slices.
    """

    image: SliceArray
    target: SliceArray
    weight: SliceArray
    human_slices: list[int]
    pseudo_slices: list[int]
    num_classes: int
    norm: tuple[float, float]
    smoothing: tuple[float, float] = (0.0, 0.0)
    windowed: bool = False
    #: Slices a windowed set cuts windows from cached whole slices (the human slices,
    #: drawn every iteration, when they all fit the cache).
    cut_from_cache: frozenset[int] = frozenset()
    #: ``load(lo, hi, window)`` of the image and of (target, weight), windows only.
    loaders: tuple[Callable, Callable] | None = field(default=None, repr=False)
    #: Human voxels held out for validation, per slice: ``(labels, held)``, (H, W)
    #: integer labels and the bool mask of the held-out voxels. ``target`` and
    #: ``weight`` never hold them (weight 0, target 0, never pseudo-labelled).
    held_out: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    #: The human voxels trained on, per human slice: ``(labels, mask)`` (H, W).
    human: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def human_voxels(self, *, held_out: bool) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """``(labels, mask)`` (H, W) per human slice: the voxels trained on, and with
        ``held_out`` also those held out for validation (every human voxel)."""
        out = dict(self.human)
        if held_out:
            for i, (labels, held) in self.held_out.items():
                out[i] = (labels, out[i][1] | held)
        return out

    def window(
        self, lo: int, hi: int, rows: slice, cols: slice, *, labels: bool = True
    ) -> tuple[np.ndarray, ...]:
        """Slices ``lo..hi-1`` cut to the in-plane window ``rows`` x ``cols``.

        Equals ``self.image[lo:hi][:, rows, cols]`` (and the same of ``target`` and
        ``weight`` with ``labels``), but a windowed set reads only the window, plus the
        smoothing's halo, from the project: a 96^2 crop of a 2048^2 slice no longer
        reads, normalises and smooths the whole slice (nor evicts cached ones). Slices
        in ``cut_from_cache`` are still cut from cached whole slices.

        Parameters
        ----------
        lo, hi : int
            Slice range, ``0 <= lo < hi <= S``.
        rows, cols : slice
            In-plane window (steps of 1; a stop past the edge is clipped).
        labels : bool
            Also return target and weight.

        Returns
        -------
        tuple of (hi - lo, h, w) ndarrays
            image (float32), then target (int32) and weight (float32) with ``labels``.
        """
        views = (self.image, self.target, self.weight)[: 3 if labels else 1]
        if not self.windowed or set(range(lo, hi)) <= self.cut_from_cache:
            return tuple(np.stack([view[i][rows, cols] for i in range(lo, hi)]) for view in views)
        load_image, load_labels = self.loaders
        plane = self.image.shape[1:]
        window = tuple(
            (w.start or 0, min(size, size if w.stop is None else w.stop))
            for w, size in zip((rows, cols), plane, strict=True)
        )
        return load_image(lo, hi, window) + (load_labels(lo, hi, window) if labels else ())

    def drop_cache(self) -> None:
        """Forget the cached slices (prediction needs none); later reads refill the cache."""
        for view in (self.image, self.target, self.weight):
            view._cache.clear()


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
    Whole arrays in memory; :func:`load_training_set` applies the same rule slab by slab
    (:func:`pseudo_label_floors`).

    Parameters
    ----------
    pseudo : (S, H, W) integer ndarray
        The round's labels.
    confidence : (S, H, W) float32 ndarray
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
    floors, _ = pseudo_label_floors(
        lambda: iter([(pseudo, confidence, free)]),
        threshold,
        class_share,
        max_samples=max_samples,
    )
    return _confident(pseudo, confidence, free, floors)


def pseudo_label_floors(
    blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]],
    threshold: float,
    class_share: float,
    *,
    max_samples: int = 2_000_000,
) -> tuple[np.ndarray, np.ndarray]:
    """The confidence each class's pseudo-labels need, from a volume streamed in blocks.

    Parameters
    ----------
    blocks : callable
        Returns an iterator over ``(pseudo, confidence, free)`` blocks of the volume, in
        order (slice-first); called twice (class sizes, then quantiles), so a volume
        larger than memory is read twice, block by block.
    threshold, class_share, max_samples
        As in :func:`confident_pseudo_labels`.

    Returns
    -------
    floors : (K,) float32 ndarray
        Per class value, the smallest confidence at which its free voxels are used:
        ``threshold``, or the class's ``1 - class_share`` confidence quantile where that
        is lower. Each class's quantile is taken over every ``n // max_samples``-th of
        its ``n`` free voxels in volume order (all of them in a small volume).
    block_peaks : (S, K) float32 ndarray
        Per slice of the blocks (in order) and class, the highest confidence of a free
        voxel predicted as that class (-inf where none), so that a slice holds a usable
        pseudo-label where ``(block_peaks >= floors).any(1)``.
    """
    counts: dict[int, int] = {}
    for pseudo, _, free in blocks():
        values, n = np.unique(pseudo[free], return_counts=True)
        for c, k in zip(values.tolist(), n.tolist(), strict=True):
            counts[c] = counts.get(c, 0) + k
    size = max(counts, default=0) + 1
    strides = {c: max(1, n // max_samples) for c, n in counts.items()}
    seen = dict.fromkeys(counts, 0)
    samples: dict[int, list[np.ndarray]] = {c: [] for c in counts}
    peaks = []
    for pseudo, confidence, free in blocks():
        free_class, free_conf = pseudo[free], confidence[free]
        for c in counts:
            values = free_conf[free_class == c]
            # Continue one stride across blocks: values[::stride] of the whole volume. A
            # copy, not a strided view: a view keeps the block's every value alive (the
            # whole confidence volume by the end: 4.3 GB at 256 x 2048 x 2048).
            samples[c].append(values[(-seen[c]) % strides[c] :: strides[c]].copy())
            seen[c] += values.size
        peak = np.full((len(pseudo), size), -np.inf, np.float32)
        for c in counts:
            masked = np.where(free & (pseudo == c), confidence, -np.inf)
            peak[:, c] = masked.reshape(len(pseudo), -1).max(1)
        peaks.append(peak)
    # float32 like the confidences, so ``confidence >= floor`` compares as numpy does
    # with a Python float threshold.
    floors = np.full(size, threshold, np.float32)
    if class_share > 0:
        for c, parts in samples.items():
            floors[c] = min(
                floors[c], np.float32(np.quantile(np.concatenate(parts), 1 - class_share))
            )
    block_peaks = np.concatenate(peaks) if peaks else np.zeros((0, size), np.float32)
    return floors, block_peaks


def _confident(
    pseudo: np.ndarray, confidence: np.ndarray, free: np.ndarray, floors: np.ndarray
) -> np.ndarray:
    """``free & (confidence >= floors[pseudo])`` (classes no free voxel had: never used)."""
    if floors.size == 0:
        return np.zeros(pseudo.shape, bool)
    return free & (confidence >= np.take(floors, pseudo, mode="clip"))


#: Bytes of prepared slices a :class:`TrainingSet` keeps per view kind (image; labels).
TRAINING_CACHE_BYTES = 256 * 2**20


def load_training_set(
    project: Project,
    config: TrainConfig,
    *,
    pseudo_round: int | None = None,
    cache_bytes: int | None = None,
    holdout: float = 0.0,
    rotation: int = 0,
) -> TrainingSet:
    """Prepare what a round trains on from ``project``, reading slices on demand.

    The human labels of the annotated slices are read now (a snapshot); with an earlier
    round, its pseudo-labels and confidences are streamed twice to find the confident
    ones; the image and the labels of other slices are read when a batch first needs
    them. Memory stays near ``2 * cache_bytes`` plus the human slices, whatever the
    volume's size.

    Parameters
    ----------
    pseudo_round : int, optional
        Round whose confident pseudo-labels join the labelled set (default: the latest;
        0 = none).
    cache_bytes : int, optional
        Prepared slices kept for reuse, per kind (image; target and weight); default
        :data:`TRAINING_CACHE_BYTES`. A volume whose prepared labels (8 bytes a voxel)
        are larger is sampled window by window (:meth:`TrainingSet.window`).
    holdout : float
        Share of the human voxels held out for validation, in [0, 0.5]: a band of rows
        of each human slice (:func:`napari_ssl_seg.validation.holdout_bands`), kept in
        ``held_out`` and out of ``target``, ``weight`` and the pseudo-labels.
    rotation : int
        Which band is held out (the engine passes the round number plus the seed).

    Raises
    ------
    InvalidInputError
        No voxel is annotated or corrected yet.
    """
    cache_bytes = TRAINING_CACHE_BYTES if cache_bytes is None else cache_bytes
    axis, n = project.axis, project.n_slices
    plane = tuple(s for a, s in enumerate(project.shape) if a != axis)
    human_slices = sorted(set(project.annotated_slices()) | set(project.corrected_slices()))
    if not human_slices:
        raise InvalidInputError(
            f"{project.path}: no slice is annotated yet; annotate at least one slice "
            "(an empty slice counts when marked as annotated background)"
        )
    human = {i: project.human_labels(project.slice_index(i)) for i in human_slices}
    num_classes = max(
        2, max(int(labels[mask].max(initial=0)) for labels, mask in human.values()) + 1
    )
    # Every human voxel, held out or not, is off limits to pseudo-labels.
    known = {i: mask for i, (_, mask) in human.items()}
    held = holdout_bands(human, holdout, rotation)
    held_out = {i: (human[i][0], held[i]) for i in held if held[i].any()}
    for i, (labels, mask) in held_out.items():
        human[i] = (np.where(mask, 0, labels).astype(labels.dtype), known[i] & ~mask)

    norm = normalisation(project.image, axis)
    smoothing = smoothing_sigmas(config.smoothing, project)
    halo = smoothing_halo(smoothing)

    plane_halo = smoothing_halo((smoothing[1], 0.0))

    def read(array, lo: int, hi: int, window=None) -> np.ndarray:
        """Slices lo..hi-1 of ``array``, slice axis first, cut to ``window`` if given."""
        return np.moveaxis(np.asarray(array[slab_index(axis, lo, hi, window)]), axis, 0)

    def load_image(lo: int, hi: int, window=None) -> tuple[np.ndarray]:
        first, last = max(0, lo - halo), min(n, hi + halo)
        keep = slice(lo - first, hi - first)
        if window is None:
            return (smooth(normalise(read(project.image, first, last), norm), smoothing, keep),)
        # The window grown by the in-plane halo (clipped where the plane ends, as the
        # whole slice is), smoothed, cut back: the same voxels as the whole slice's.
        grown = grown_ranges(window, (plane_halo, plane_halo), plane)
        block = smooth(normalise(read(project.image, first, last, grown), norm), smoothing, keep)
        return (np.ascontiguousarray(block[(slice(None), *ranges_within(window, grown))]),)

    pseudo_round = project.latest_round if pseudo_round is None else pseudo_round
    use_pseudo = pseudo_round >= 1 and config.pseudo_weight > 0
    floors = np.zeros(0, np.float32)
    pseudo_slices: list[int] = []
    if use_pseudo:
        pseudo_array = project.pseudo_labels(pseudo_round)
        confidence_array = project.confidence(pseudo_round)

        def free_mask(lo: int, hi: int, window=None) -> np.ndarray:
            cut = _cut(window)
            free = np.ones((hi - lo, *_window_shape(plane, window)), bool)
            for i in range(lo, hi):
                if i in known:
                    free[i - lo] = ~known[i][cut]
            return free

        def blocks():
            for index in iter_slabs(project.shape, axis):
                lo, hi = index[axis].start, index[axis].stop
                yield read(pseudo_array, lo, hi), read(confidence_array, lo, hi), free_mask(lo, hi)

        floors, peaks = pseudo_label_floors(
            blocks, config.pseudo_threshold, config.pseudo_class_share
        )
        usable = (peaks >= floors).any(1) if floors.size else np.zeros(n, bool)
        pseudo_slices = [int(i) for i in np.flatnonzero(usable) if int(i) not in human]

    def load_labels(lo: int, hi: int, window=None) -> tuple[np.ndarray, np.ndarray]:
        cut = _cut(window)
        target = np.zeros((hi - lo, *_window_shape(plane, window)), np.int32)
        weight = np.zeros(target.shape, np.float32)
        for i in range(lo, hi):
            if i in human:
                labels, mask = human[i]
                target[i - lo], weight[i - lo] = labels[cut], mask[cut]
        if use_pseudo:
            pseudo = read(pseudo_array, lo, hi, window)
            confidence = read(confidence_array, lo, hi, window)
            use = _confident(pseudo, confidence, free_mask(lo, hi, window), floors)
            target[use] = pseudo[use]
            weight[use] = config.pseudo_weight
        return target, weight

    shape, voxels = (n, *plane), int(np.prod(plane))
    images = _SliceCache(load_image, cache_bytes)
    labels = _SliceCache(load_labels, cache_bytes)
    return TrainingSet(
        SliceArray(images, 0, shape, np.dtype(np.float32)),
        SliceArray(labels, 0, shape, np.dtype(np.int32)),
        SliceArray(labels, 1, shape, np.dtype(np.float32)),
        human_slices,
        pseudo_slices,
        num_classes,
        norm,
        smoothing,
        # Target and weight take 8 bytes a voxel (the image 4): windows once they do not
        # all fit (16 x 2048^2 fits an image cache, then thrashed the labels one).
        windowed=n * voxels * 8 > cache_bytes,
        cut_from_cache=frozenset(human if len(human) * voxels * 8 <= cache_bytes else ()),
        loaders=(load_image, load_labels),
        held_out=held_out,
        human=human,
    )


def grown_ranges(ranges, by, sizes) -> list[tuple[int, int]]:
    """``(first, stop)`` ranges grown by ``by`` on each side, clipped to ``[0, size)``."""
    return [(max(0, a - b), min(s, z + b)) for (a, z), b, s in zip(ranges, by, sizes, strict=True)]


def ranges_within(inner, outer) -> tuple[slice, ...]:
    """Slices that cut the ``inner`` ranges out of an array covering the ``outer`` ones."""
    return tuple(slice(a - o, z - o) for (a, z), (o, _) in zip(inner, outer, strict=True))


def _cut(window) -> tuple[slice, slice]:
    """In-plane index of ``window`` ((start, stop) per axis; None = the whole plane)."""
    return (slice(None), slice(None)) if window is None else tuple(slice(*w) for w in window)


def _window_shape(plane: tuple[int, int], window) -> tuple[int, int]:
    return tuple(plane) if window is None else tuple(z - a for a, z in window)


def slab_index(axis: int, lo: int, hi: int, window=None) -> tuple[slice, ...]:
    """Index, in the project's axis order, of slices ``lo..hi-1`` along ``axis``, cut
    in-plane to ``window`` ((start, stop) per remaining axis, in order; None = whole)."""
    index = [slice(None)] * 3
    index[axis] = slice(lo, hi)
    if window is not None:
        for a, (start, stop) in zip([a for a in range(3) if a != axis], window, strict=True):
            index[a] = slice(start, stop)
    return tuple(index)


class _SliceCache:
    """Slices made by ``load(lo, hi)`` (a tuple of (hi - lo, H, W) arrays), kept in a
    least-recently-used cache of at most ``max_bytes``."""

    def __init__(self, load: Callable[[int, int], tuple[np.ndarray, ...]], max_bytes: int):
        self._load = load
        self._max_bytes = max_bytes
        self._slices: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()
        self._bytes = 0

    def get(self, indices: Sequence[int]) -> list[tuple[np.ndarray, ...]]:
        found = {i: self._slices[i] for i in indices if i in self._slices}
        missing = sorted(set(indices) - set(found))
        # Contiguous runs are read as one block (one halo, one read per chunk row).
        runs = np.split(np.asarray(missing, int), np.flatnonzero(np.diff(missing) != 1) + 1)
        for run in runs if missing else []:
            lo, hi = int(run[0]), int(run[-1]) + 1
            block = self._load(lo, hi)
            for i in range(lo, hi):
                found[i] = tuple(np.array(part[i - lo]) for part in block)
                self._put(i, found[i])
        for i in found:
            if i in self._slices:
                self._slices.move_to_end(i)
        return [found[i] for i in indices]

    def clear(self) -> None:
        self._slices.clear()
        self._bytes = 0

    def _put(self, i: int, item: tuple[np.ndarray, ...]) -> None:
        self._slices[i] = item
        self._bytes += sum(a.nbytes for a in item)
        while self._bytes > self._max_bytes and len(self._slices) > 1:
            _, old = self._slices.popitem(last=False)
            self._bytes -= sum(a.nbytes for a in old)


class SliceArray:
    """A read-only, slice-first (S, H, W) volume read on demand (see :class:`TrainingSet`).

    Index it along its first axis only: ``view[i]`` is one (H, W) slice, ``view[a:b]`` and
    ``view[[i, j]]`` stack (k, H, W); ``np.asarray(view)`` reads every slice.
    """

    def __init__(self, cache: _SliceCache, part: int, shape: tuple[int, ...], dtype) -> None:
        self._cache, self._part = cache, part
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, int | np.integer):
            i = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"slice {key} out of range for {self.shape[0]} slices")
            return self._cache.get([i])[0][self._part]
        if isinstance(key, slice):
            indices = list(range(*key.indices(self.shape[0])))
        else:
            indices = np.asarray(key)
            if indices.ndim != 1 or indices.dtype.kind not in "iu":
                raise TypeError("index a SliceArray with an int, a slice or a list of ints")
            indices = [self._check(int(i)) for i in indices]
        if not indices:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        return np.stack([item[self._part] for item in self._cache.get(indices)])

    def _check(self, i: int) -> int:
        if not -self.shape[0] <= i < self.shape[0]:
            raise IndexError(f"slice {i} out of range for {self.shape[0]} slices")
        return i % self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


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


KEYS = ("image", "target", "weight")  # of a training sample


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
        # Square in-plane crops: a quarter turn of a non-square crop would not stack
        # with unturned ones (slices of 60 x 256 along a project's axis 1, say).
        side = min(data.image.shape[1:])
        if spatial == 2:
            size = [min(config.patch_size, side)] * 2
        else:
            cube = max(32, config.patch_size // 2)
            size = [min(cube, data.image.shape[0]), *[min(cube, side)] * 2]
        pad = [max(16, int(np.ceil(s / 16) * 16)) for s in size]
        self.crop_size = tuple(pad)  # (H, W) or (D, H, W), after padding to 16
        keys = list(KEYS)
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

    def _window(self, plane: tuple[int, int]) -> tuple[slice, slice]:
        """A random in-plane window of the crop's (padded) size, uniform over the plane
        (the 3D cubes' and, on a windowed set, every crop's)."""
        side = self.crop_size[-1]
        starts = [int(self.rng.integers(0, max(0, size - side) + 1)) for size in plane]
        return tuple(slice(a, a + side) for a in starts)

    def _sample(self, index: int, labelled: bool) -> dict[str, np.ndarray]:
        d, n = self.data, self.data.image.shape[0]
        if self.mode == "3d" or d.windowed:
            # Read only the crop's in-plane window (MONAI's crop below then keeps all of
            # it): a cube of whole 2048^2 slices held ~800 MB for a 48^2 crop, and a 2D
            # crop of a big slice read, normalised and smoothed the whole slice.
            if self.mode == "3d":
                half = max(16, self.config.patch_size // 4)
                lo = max(0, min(index - half, n - 2 * half))
                hi = min(lo + 2 * half, n)
            else:  # 2.5D also needs the neighbours (clamped at the ends)
                lo = max(0, index - 1) if self.mode == "2.5d" else index
                hi = min(n, index + 2) if self.mode == "2.5d" else index + 1
            window = self._window(d.image.shape[1:])
            parts = d.window(lo, hi, *window, labels=labelled)
            if self.mode == "3d":
                item = {key: part[None] for key, part in zip(KEYS, parts, strict=False)}
            else:
                item = {"image": slice_stack(parts[0], [index - lo], self.mode)[0]}
                item |= {k: p[index - lo][None] for k, p in zip(KEYS[1:], parts[1:], strict=False)}
        else:
            item = {"image": slice_stack(d.image, [index], self.mode)[0]}
            if labelled:
                item |= {"target": d.target[index][None], "weight": d.weight[index][None]}
        if not labelled:  # labels are not read for the unlabelled stream
            spatial = item["image"].shape[1:]
            item |= {"target": np.zeros((1, *spatial), np.int32)}
            item |= {"weight": np.zeros((1, *spatial), np.float32)}
        return {k: np.asarray(v) for k, v in self._augment(item).items()}

    def _augment(self, item: dict[str, np.ndarray]) -> dict:
        """The MONAI augmentation, returning plain tensors: crops need no affine or
        transform history, and tracking it as MetaTensors took ~60 % of the sampler's
        time (20 -> 11 ms a labelled batch on the sample). Same values, same draws."""
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return self.transform(item)
        finally:
            set_track_meta(tracking)

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
    "SliceArray",
    "TrainingSet",
    "confident_pseudo_labels",
    "grown_ranges",
    "ranges_within",
    "pseudo_label_floors",
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
