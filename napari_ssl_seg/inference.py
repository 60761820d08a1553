"""Whole-volume prediction, written slab by slab, with confidence and slice ranking.

Slices are read from the project, normalised, predicted (whole, or by MONAI's sliding
window when larger than ``tile``) and written to the round's arrays before the next slab
is read, so a volume larger than memory can be predicted. In 3D mode the network's
output goes into the round's arrays block by block (:func:`_predict_3d_into`), and a
second streamed pass votes on it and ranks the slices. A slice-wise round may write the
pixel forest's probabilities, or their mean with the network's, instead of the network's
(``source``; :mod:`napari_ssl_seg.validation` chooses).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from scipy import ndimage as ndi

from napari_ssl_seg.data import (
    grown_ranges,
    normalise,
    ranges_within,
    slab_index,
    slice_stack,
    smooth,
    smoothing_halo,
)
from napari_ssl_seg.forest import PixelForest
from napari_ssl_seg.methods.base import SSLMethod
from napari_ssl_seg.store import Project, RoundWriter

#: Slices with a side above this are predicted tile by tile (MONAI's sliding window).
TILE = 512
#: Slice-wise tiles overlap by at least this many pixels, and are laid out so that no
#: more tiles than that needs are predicted (:func:`tile_layout`). MONAI's fixed overlap
#: of 0.25 predicted a 1024^2 slice in 3 x 3 tiles of 512^2 (2.25x its voxels).
#: ``benchmarks/tile_layout.py`` (2 cores, 4 slices of the sample mirrored out), before
#: -> after: 768^2 3.40 -> 2.11 s, 1024^2 7.78 -> 3.71 s, 2048^2 24.5 -> 20.3 s; voxels
#: labelled as a whole-slice prediction labels them 99.98-99.99 % -> 99.98 %, Dice
#: against the truth within 0.0001.
TILE_MARGIN = 64
#: Voxels a slice-wise prediction batch holds: one tile's worth, so smaller slices never
#: take more memory through the network than one tile of a large slice does. Measured
#: (2 cores, untrained supervised net): 2**20 voxels (16 slices of 256^2, 4 of 512^2)
#: peaked at 1293 / 1339 MB against 710 / 722 MB with one tile's worth, and predicted
#: the sample no slower (4.3 s vs 4.7 s for 60 x 256^2).
VOXELS_PER_BATCH = TILE * TILE


def slices_per_batch(plane_voxels: int, voxels_per_batch: int | None = None) -> int:
    """Slices a slice-wise prediction batch takes: about ``voxels_per_batch`` voxels
    (default :data:`VOXELS_PER_BATCH`), 1 to 32, so host memory stays flat from 256^2 to
    2048^2 slices (slices above :data:`TILE` go one at a time, tiled)."""
    voxels = VOXELS_PER_BATCH if voxels_per_batch is None else voxels_per_batch
    return max(1, min(32, voxels // max(1, plane_voxels)))


#: 3D mode: voxels a block reads through the network (what it predicts plus
#: :data:`HALO_3D` of context on every side). A volume this small (the 60 x 256 x 256
#: sample) goes through whole.
VOXELS_PER_3D_BLOCK = 2**24
#: 3D mode: voxels of context a block reads beyond those it predicts, on every side.
HALO_3D = 16
#: 3D mode: in-plane side of the blocks of a larger volume. Narrow columns let a block
#: run deep, so its context is a small share of what it reads: blocks of 4 whole 2048^2
#: slices (the layout before) read 36 slices to predict 4, 9x the network's work.
TILE_3D = 256


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad the spatial dims of ``x`` up to a multiple (UNet pooling needs it)."""
    spatial = x.shape[2:]
    target = [int(np.ceil(s / multiple) * multiple) for s in spatial]
    pads: list[int] = []
    for s, t in reversed(list(zip(spatial, target, strict=True))):
        pads += [0, t - s]
    return F.pad(x, pads, mode="replicate") if any(pads) else x, tuple(spatial)


def tile_layout(size: int, tile: int, margin: int) -> tuple[int, float]:
    """Window side and MONAI overlap that cover ``size`` pixels with the fewest windows
    of at most ``tile`` (a multiple of 16) overlapping by at least ``margin``.

    Returns ``(size, 0.0)`` when ``size`` fits one window. ``margin`` is capped at half
    of ``tile``.
    """
    if size <= tile:
        return size, 0.0
    margin = min(margin, tile // 2)
    count = math.ceil((size - margin) / (tile - margin))
    side = min(tile, math.ceil(math.ceil((size + (count - 1) * margin) / count) / 16) * 16)
    step = math.ceil((size - side) / (count - 1))
    # MONAI's step is int(side * (1 - overlap)): half a pixel of slack against rounding.
    return side, 1.0 - (step + 0.5) / side


@torch.no_grad()
def predict_probabilities(
    method: SSLMethod,
    image: torch.Tensor,
    *,
    tile: int = TILE,
    margin: int | None = TILE_MARGIN,
) -> torch.Tensor:
    """Class probabilities of a batch of slices or volumes.

    Parameters
    ----------
    image : (B, C, H, W) or (B, C, D, H, W) float32 tensor
    tile : int
        Inputs with a side larger than this are predicted by a Gaussian-blended sliding
        window of at most this size (memory stays bounded on large slices).
    margin : int or None
        Least overlap of the windows, in pixels (:func:`tile_layout`); None: windows of
        ``tile`` overlapping by a quarter of it, as MONAI lays them out (3D mode).

    Returns
    -------
    (B, K, ...) float32 tensor of softmax probabilities.
    """
    method.eval()
    if max(image.shape[2:]) > tile:
        if margin is None:
            roi = tuple(max(16, min(tile, s) // 16 * 16) for s in image.shape[2:])
            overlap: list[float] | float = 0.25
        else:
            layouts = [tile_layout(s, tile, margin) for s in image.shape[2:]]
            roi, overlap = tuple(side for side, _ in layouts), [o for _, o in layouts]

        def predictor(x: torch.Tensor) -> torch.Tensor:
            padded, size = _pad_to(x, 16)
            out = method.predict(padded)
            return out[(..., *[slice(0, s) for s in size])]

        return sliding_window_inference(
            image, roi, sw_batch_size=1, predictor=predictor, overlap=overlap, mode="gaussian"
        )
    padded, size = _pad_to(image, 16)
    return method.predict(padded)[(..., *[slice(0, s) for s in size])]


@torch.no_grad()
def recalibrate_batchnorm(method: SSLMethod, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate BatchNorm running statistics as a plain average over ``batches``.

    With a few annotated slices the network's output is very sensitive to the BatchNorm
    statistics that eval mode uses, and the default running average (momentum 0.1)
    follows the last ~10 small batches: the prediction of the same weights moves by
    several Dice points from one iteration to the next. Averaging the statistics over
    many training-distribution batches (cumulative average) removes that noise. Whole
    slices are *not* used: their statistics differ from the training crops' and shift the
    boundaries (measured: Dice 0.955 -> 0.917 on the sample). The batches go through every
    plain UNet backbone (``BasicUNet``, ``DualHeadUNet``) of the method, or through the
    method's own ``batchnorm_forward(x)`` where it defines one (the diffusion method).

    Parameters
    ----------
    batches : iterable of (B, C, H, W) float32 tensors
        Inputs drawn like the training batches (labelled and unlabelled crops).

    Returns
    -------
    int
        Number of BatchNorm layers recalibrated (those the forward passes reach).
    """
    from monai.networks.nets import BasicUNet

    from napari_ssl_seg.models import DualHeadUNet

    forward = getattr(method, "batchnorm_forward", None)
    if forward is None:
        nets = [m for m in method.modules() if isinstance(m, BasicUNet | DualHeadUNet)]
        nets = [n for n in nets if not any(n is not o and n in set(o.modules()) for o in nets)]

        def forward(x: torch.Tensor) -> None:
            for net in nets:
                net(x)

    # A layer is reset on its first call, so layers the forward never reaches (the
    # diffusion teacher's image pathway) keep their statistics.
    momenta: dict[torch.nn.Module, float | None] = {}

    def reset_on_first_call(module: torch.nn.Module, _inputs) -> None:
        if module not in momenta:
            momenta[module] = module.momentum
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the recalibration batches

    norms = [m for m in method.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:  # nothing to recalibrate: do not draw (or run) the batches at all
        return 0
    hooks = [m.register_forward_pre_hook(reset_on_first_call) for m in norms]
    was_training = method.training
    method.train()
    try:
        for x in batches:
            forward(x)
    finally:
        for hook in hooks:
            hook.remove()
        method.train(was_training)
        for module, momentum in momenta.items():
            module.momentum = momentum
    return len(momenta)


def adjust_background(probs: torch.Tensor, bias: float) -> torch.Tensor:
    """Softmax probabilities with ``bias`` added to the background log-probability.

    ``probs`` is (B, K, ...); a positive bias makes the model more conservative.
    """
    if bias == 0.0:
        return probs
    logp = probs.clamp_min(1e-8).log()
    logp[:, 0] += bias
    return logp.softmax(1)


@torch.no_grad()
def calibrate_background_bias(
    method: SSLMethod,
    image: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray,
    slices: list[int],
    *,
    mode: str,
    device: torch.device,
    grid: np.ndarray | None = None,
) -> float:
    """The background bias that maximises Dice on the human-labelled voxels.

    With a few annotated slices the decision boundary of the network is biased as a
    whole (on the sample it paints nuclei ~10 % too large, on its own training slices
    too), and that bias moves with the BatchNorm statistics. One scalar, fitted on the
    voxels humans labelled, removes most of it - the diffusion paper likewise picks its
    threshold on labelled data. Ties go to the bias closest to 0.

    Parameters
    ----------
    image : (S, H, W) float32 ndarray or :class:`~napari_ssl_seg.data.SliceArray`
        Normalised volume, slice axis first (only ``slices`` and, in 2.5D, their
        neighbours are read).
    target, weight : (S, H, W) ndarrays or SliceArrays
        Labels and loss weights (1 = human voxel) of :class:`~napari_ssl_seg.data.TrainingSet`.
    slices : list of int
        Slices holding human voxels.

    Returns
    -------
    float
        The bias for :func:`adjust_background` (0 when nothing can be fitted).
    """
    if mode == "3d" or not slices:
        return 0.0
    grid = np.round(np.linspace(-3, 3, 25), 4) if grid is None else grid
    biases = sorted(grid, key=abs)
    # Per bias and class: (overlap, predicted, true) voxel counts over the human voxels,
    # summed batch by batch so that many corrected slices never go through the network
    # (or sit in memory as probabilities) at once.
    counts = np.zeros((len(biases), method.num_classes, 3), np.int64)
    per_batch = slices_per_batch(int(np.prod(image.shape[1:])))
    for first in range(0, len(slices), per_batch):
        batch = list(slices[first : first + per_batch])
        x = torch.from_numpy(slice_stack(image, batch, mode)).to(device)
        logp = predict_probabilities(method, x).clamp_min(1e-8).log().cpu()
        human = torch.from_numpy(weight[batch] >= 1.0)
        truth = torch.from_numpy(target[batch])[human]
        # Only human voxels count: keep their (N, K) rows, so each bias's argmax runs
        # over N short contiguous rows (over the class axis of two whole 2048^2 slices
        # it took 0.6 s a bias, 15 s a round).
        logp = logp.movedim(1, -1)[human]
        for b, bias in enumerate(biases):
            shifted = logp.clone()
            shifted[:, 0] += float(bias)
            pred = shifted.argmax(1)
            for c in range(1, logp.shape[1]):
                p, t = pred == c, truth == c
                counts[b, c] += [int((p & t).sum()), int(p.sum()), int(t.sum())]
    if not counts[0, 1:, 2].any():
        return 0.0
    best, best_score = 0.0, -1.0
    for bias, per_class in zip(biases, counts, strict=True):
        scores = [
            2.0 * overlap / (predicted + true)
            for overlap, predicted, true in per_class[1:]
            if predicted + true > 0
        ]
        score = float(np.mean(scores)) if scores else 0.0
        if score > best_score + 1e-6:
            best, best_score = float(bias), score
    return best


def predict_into_round(
    project: Project,
    method: SSLMethod,
    writer: RoundWriter,
    *,
    norm: tuple[float, float],
    mode: str,
    device: torch.device,
    background_bias: float = 0.0,
    vote_window: tuple[int, int, int] = (1, 1, 1),
    smoothing: tuple[float, float] = (0.0, 0.0),
    voxels_per_batch: int = VOXELS_PER_BATCH,
    source: str = "network",
    forest: PixelForest | None = None,
) -> Iterator[dict]:
    """Predict every slice of the project into ``writer``; yields progress dicts.

    ``source`` is what is written: "network" (``method``'s probabilities), "forest"
    (``forest``'s, on the same normalised and smoothed slices) or "ensemble" (the mean
    of the two); the background bias, the argmax, the vote, the confidence (the written
    class's probability) and the slice ranking then apply to it. 3D mode writes the
    network only.

    ``smoothing`` holds the Gaussian sigmas (across slices, in-plane) the training image
    was smoothed with (:func:`napari_ssl_seg.data.smoothing_sigmas`); the input is
    smoothed the same way.

    ``vote_window`` (slices, rows, columns; odd) applies :func:`majority_vote` to the
    predicted labels before they are written; (1, 1, 1) writes the network's argmax.

    Yields ``predict`` progress (slices done, of ``n_slices``); in 3D mode, where the
    network's output is written block by block first, then ``write`` progress of the
    pass that votes on it and scores the slices.

    Returns (as the generator's value) the per-slice uncertainty score: the mean of
    1 - confidence over the slice's voxels that no human labelled (NaN for slices that
    humans fully labelled).
    """
    if source not in SOURCES or (source != "network" and (forest is None or mode == "3d")):
        raise ValueError(
            f"source must be one of {SOURCES} (forest and ensemble need a forest and a "
            f"slice-wise mode), got {source!r} with forest={forest is not None}, mode={mode!r}"
        )
    axis, n = project.axis, project.n_slices
    scores = np.full(n, np.nan, np.float64)
    voting = any(w > 1 for w in vote_window)
    if mode == "3d":
        yield from _predict_3d_into(
            project, method, writer, norm=norm, device=device, smoothing=smoothing
        )
        # The second pass reads the written output back slab by slab: the vote sees
        # unvoted slices only (it holds its context itself), and it writes a slab only
        # after reading past it.
        slabs, phase, rewrite = _stored_slabs(project, writer), "write", voting
    else:
        slabs = _predicted_slabs(
            project,
            method,
            norm=norm,
            mode=mode,
            device=device,
            background_bias=background_bias,
            smoothing=smoothing,
            voxels_per_batch=voxels_per_batch,
            source=source,
            forest=forest,
        )
        phase, rewrite = "predict", True
    if voting:
        slabs = majority_vote(slabs, n, vote_window, num_classes=method.num_classes)
    for start, stop, labels, confidence in slabs:
        index = slab_index(axis, start, stop)
        if rewrite:
            writer.write(index, np.moveaxis(labels, 0, axis), np.moveaxis(confidence, 0, axis))
        human = np.moveaxis(project.human_mask(index), axis, 0)
        for j in range(stop - start):
            free = ~human[j]
            if free.any():
                scores[start + j] = float((1.0 - confidence[j][free]).mean())
        yield {"phase": phase, "iteration": stop, "total": n}
    return scores


Slab = tuple[int, int, np.ndarray, np.ndarray]


def _predicted_slabs(
    project: Project,
    method: SSLMethod,
    *,
    norm: tuple[float, float],
    mode: str,
    device: torch.device,
    background_bias: float,
    smoothing: tuple[float, float],
    voxels_per_batch: int,
    source: str = "network",
    forest: PixelForest | None = None,
) -> Iterator[Slab]:
    """2D/2.5D ``(start, stop, labels, confidence)`` per slab of slices, in order.

    ``labels`` is (stop - start, H, W) uint16 (the argmax of ``source``'s probabilities,
    see :func:`predict_into_round`), ``confidence`` the same shape float32 (the max class
    probability); slice axis first. The forest's features are made one slice at a time.
    """
    axis, n = project.axis, project.n_slices
    per_batch = slices_per_batch(int(np.prod(project.shape)) // n, voxels_per_batch)
    # One neighbour each side for 2.5D input (none in 2D: a 2048^2 slice's neighbours are
    # 32 MB of float32), and the smoothing's halo beyond it.
    context = 1 if mode == "2.5d" else 0
    halo = smoothing_halo(smoothing)
    for start, stop in _slabs(n, per_batch):
        lo, hi = max(0, start - context), min(n, stop + context)
        read_lo, read_hi = max(0, lo - halo), min(n, hi + halo)
        block = np.moveaxis(
            normalise(project.image[slab_index(axis, read_lo, read_hi)], norm), axis, 0
        )
        block = smooth(block, smoothing, slice(lo - read_lo, hi - read_lo))
        own = np.arange(start - lo, stop - lo)
        probs = source_probabilities(source, method, forest, block, own, mode=mode, device=device)
        probs = adjust_background(probs, background_bias)
        probs = probs.movedim(1, 0).cpu().numpy()  # (K, slices, H, W)
        yield start, stop, probs.argmax(0).astype(np.uint16), probs.max(0).astype(np.float32)


#: What a slice-wise round may write (see :func:`predict_into_round`).
SOURCES = ("network", "forest", "ensemble")


def source_probabilities(
    source: str,
    method: SSLMethod | None,
    forest: PixelForest | None,
    block: np.ndarray,
    slices: np.ndarray,
    *,
    mode: str,
    device: torch.device,
) -> torch.Tensor:
    """Class probabilities of ``source`` for some slices of a prepared block.

    Parameters
    ----------
    source : {"network", "forest", "ensemble"}
        The network's softmax, the forest's probabilities, or their mean.
    block : (S, H, W) float32 ndarray or SliceArray
        Normalised (and smoothed) slices, slice axis first, with the 2.5D neighbours of
        ``slices`` where there are any.
    slices : (B,) int ndarray
        Slices of ``block`` to predict.

    Returns
    -------
    (B, K, H, W) float32 tensor, on the CPU for "forest" and "ensemble".
    """
    probs = None
    if source in ("network", "ensemble"):
        x = torch.from_numpy(slice_stack(block, slices, mode))
        probs = predict_probabilities(method, x.to(device))
    if source in ("forest", "ensemble"):
        planes = np.stack([np.asarray(block[int(j)], np.float32) for j in slices])
        trees = torch.from_numpy(forest.predict_proba(planes))
        probs = trees if probs is None else (probs.cpu() + trees) / 2
    return probs


def _blocks_3d(
    sizes: tuple[int, int, int], voxels: int, halo: int
) -> list[tuple[tuple[int, int], ...]]:
    """The 3D blocks (``(start, stop)`` along slices, rows, columns) covering ``sizes``.

    One block when the volume holds at most ``voxels`` voxels; otherwise columns of at
    most :data:`TILE_3D` in-plane, as deep as a read of ``voxels`` (the block with its
    ``halo`` on every side) allows.
    """
    n, h, w = sizes
    if n * h * w <= voxels:
        return [((0, n), (0, h), (0, w))]
    tile = TILE_3D
    across = (min(tile, h) + 2 * halo) * (min(tile, w) + 2 * halo)
    depth = max(1, voxels // across - 2 * halo)
    return [
        (slab, rows, cols)
        for slab in _slabs(n, depth)
        for rows in _slabs(h, tile)
        for cols in _slabs(w, tile)
    ]


def _predict_3d_into(
    project: Project,
    method: SSLMethod,
    writer: RoundWriter,
    *,
    norm: tuple[float, float],
    device: torch.device,
    smoothing: tuple[float, float],
    blocks: list[tuple[tuple[int, int], ...]] | None = None,
    halo: int | None = None,
) -> Iterator[dict]:
    """3D mode: write the network's labels and confidence of every voxel into ``writer``.

    Each block (default: :func:`_blocks_3d` with :data:`VOXELS_PER_3D_BLOCK`; ``(start,
    stop)`` along slices, rows, columns, covering the volume once) is read with ``halo``
    (default :data:`HALO_3D`) voxels of context on each side (clipped at the volume's
    edges) plus the smoothing's halo, smoothed, predicted by MONAI's sliding window,
    cropped back and written to the round's arrays at once. Memory holds one block
    whatever the volume's size, and no voxel is predicted twice but for the context.
    Yields ``predict`` progress (slices' worth of voxels done, of ``n_slices``).
    """
    halo = HALO_3D if halo is None else halo
    axis, n = project.axis, project.n_slices
    sizes = (n, *(s for i, s in enumerate(project.shape) if i != axis))  # slice axis first
    # Beyond the context, the smoothing's own halo (across slices, in-plane): every voxel
    # the network sees is then the whole volume's smoothed voxel.
    reach = (
        halo + smoothing_halo(smoothing),
        *[halo + smoothing_halo((smoothing[1], 0.0))] * 2,
    )
    blocks = _blocks_3d(sizes, VOXELS_PER_3D_BLOCK, halo) if blocks is None else blocks
    done, total = 0, int(np.prod(sizes))
    for out in blocks:
        context = grown_ranges(out, (halo,) * 3, sizes)
        read = grown_ranges(out, reach, sizes)
        block = np.moveaxis(
            normalise(project.image[slab_index(axis, *read[0], read[1:])], norm), axis, 0
        )
        block = smooth(block, smoothing)[ranges_within(context, read)]
        x = torch.from_numpy(np.ascontiguousarray(block))[None, None]
        probs = predict_probabilities(method, x.to(device), tile=96, margin=None)[0]
        probs = probs.cpu().numpy()
        probs = probs[(slice(None), *ranges_within(out, context))]
        writer.write(
            slab_index(axis, *out[0], out[1:]),
            np.moveaxis(probs.argmax(0).astype(np.uint16), 0, axis),
            np.moveaxis(probs.max(0).astype(np.float32), 0, axis),
        )
        done += int(np.prod([b - a for a, b in out]))
        yield {"phase": "predict", "iteration": n * done // total, "total": n}


def _stored_slabs(project: Project, writer: RoundWriter) -> Iterator[Slab]:
    """The round's labels and confidence as written so far, slab by slab, slice axis first."""
    axis, n = project.axis, project.n_slices
    for start, stop in _slabs(n, slices_per_batch(int(np.prod(project.shape)) // n)):
        index = slab_index(axis, start, stop)
        yield (
            start,
            stop,
            np.moveaxis(np.asarray(writer.pseudo[index]), axis, 0),
            np.moveaxis(np.asarray(writer.confidence[index]), axis, 0),
        )


def vote_volume(labels: np.ndarray, window: tuple[int, int, int], *, num_classes: int):
    """:func:`majority_vote` of a whole (Z, Y, X) integer label volume held in memory."""
    slab = (0, len(labels), labels, np.ones(labels.shape, np.float32))
    return next(majority_vote([slab], len(labels), window, num_classes=num_classes))[2]


def majority_vote(
    slabs: Iterable[Slab], n: int, window: tuple[int, int, int], *, num_classes: int
) -> Iterator[Slab]:
    """Each voxel takes the most frequent label of the ``window`` box around it.

    A mode filter (for two classes the 3D median of the probabilities, thresholded).
    Slice-wise networks decide every slice on its own; on a noisy image their boundaries
    flicker from slice to slice and in-plane speckle appears, which the vote removes while
    keeping steps along the slice axis (a Gaussian smoothing of the probabilities erodes
    the nuclei's caps instead). Measured on the sample, 3 annotated slices, supervised,
    2 cores (seeds 0/1): window (5, 5, 5) takes noisy 0.934/0.927 to 0.958/0.959 and clean
    0.972/0.961 to 0.974/0.966 (window 3 or 7 a little less; an even width shifts the
    boundary by half a voxel).

    Streams: holds ``window[0] // 2`` slices of context each side, one slice's counts at a
    time. Ties keep the voxel's own label. Where the vote changed a label, the
    confidence becomes the winning label's share of the window.

    Parameters
    ----------
    slabs : iterable of (start, stop, labels, confidence)
        Consecutive slabs covering slices 0..n-1 in order; ``labels`` (S, H, W) integer,
        ``confidence`` (S, H, W) float32.
    n : int
        Number of slices.
    window : (int, int, int)
        Odd box widths along slices, rows and columns.
    """
    if any(w < 1 or w % 2 == 0 for w in window):
        raise ValueError(f"vote window widths must be odd and >= 1, got {window}")
    half = window[0] // 2
    size = float(np.prod(window))
    # Per-slice views, not concatenated buffers: a 2048^2 slice's labels are 8 MB and its
    # confidence 16 MB, and copying them per slab cost ~300 MB of peak (big_volume_memory).
    labels_of: dict[int, np.ndarray] = {}  # kept while a later window needs the slice
    confidence_of: dict[int, np.ndarray] = {}  # kept until the slice is yielded
    done = 0
    for start, stop, labels, confidence in slabs:
        for j in range(start, stop):
            labels_of[j], confidence_of[j] = labels[j - start], confidence[j - start]
        ready = n if stop >= n else stop - half  # slices whose context has arrived
        if ready <= done:
            continue
        out_labels = np.empty((ready - done, *labels.shape[1:]), labels.dtype)
        out_confidence = np.empty((ready - done, *labels.shape[1:]), np.float32)
        for j in range(done, ready):
            rows = np.clip(np.arange(j - half, j + half + 1), 0, n - 1)
            own = labels_of[j]
            best = np.full(own.shape, -1.0, np.float32)
            winner = own.copy()
            count = np.empty(own.shape, np.float32)
            for k in range(num_classes):
                count.fill(0.0)
                for r in rows:
                    count += labels_of[int(r)] == k
                score = ndi.uniform_filter(count, window[1:], mode="nearest")
                score /= window[0]
                score[own == k] += 0.5 / size  # ties keep the own label
                better = score > best
                winner[better], best[better] = k, score[better]
            changed = winner != own  # there the winner got no tie bonus: best is its share
            out_labels[j - done] = winner
            out_confidence[j - done] = confidence_of.pop(j)
            out_confidence[j - done][changed] = best[changed]
        yield done, ready, out_labels, out_confidence
        done = ready
        for j in [j for j in labels_of if j < done - half]:
            del labels_of[j]


def _slabs(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def rank_slices(scores: np.ndarray, top: int = 10, *, min_gap: int = 3) -> list[dict]:
    """The ``top`` least confident slices, most uncertain first, as dicts.

    Slices fully labelled by humans (NaN score) are left out, and picks are at least
    ``min_gap`` slices apart: neighbouring slices look alike, so correcting two of them
    teaches little more than correcting one.
    """
    order = [
        int(i)
        for i in np.argsort(-np.nan_to_num(scores, nan=-1.0), kind="stable")
        if np.isfinite(scores[i])
    ]
    picked: list[int] = []
    for i in order:
        if all(abs(i - j) >= min_gap for j in picked):
            picked.append(i)
        if len(picked) == top:
            break
    return [{"slice": i, "uncertainty": round(float(scores[i]), 6)} for i in picked]
