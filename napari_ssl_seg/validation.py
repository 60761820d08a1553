"""Validation on held-out human labels: which voxels are held out, and Dice on them.

Every 2D/2.5D round holds out a band of rows of each human-labelled slice: neither the
network's loss nor the forest's fit sees those voxels (:func:`napari_ssl_seg.data.
load_training_set` removes them from the training set). After training, each candidate
output (the network, the forest, their mean; each with and without the background bias
and the majority vote) labels them, and the round ships the candidate with the best mean
foreground Dice there (:func:`choose`). The band rotates with the round and the seed, so
over rounds every voxel is used for training and for validation.

Label contract: on human voxels 0 is background and 1..K-1 are classes; voxels no human
labelled are never held out, never scored, and never background.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the torch-side helpers import these when called
    import torch

    from napari_ssl_seg.data import TrainingSet
    from napari_ssl_seg.forest import ForestSettings, PixelForest
    from napari_ssl_seg.methods.base import SSLMethod

#: Candidate sources (:data:`napari_ssl_seg.inference.SOURCES`) in the order that breaks
#: ties of validation Dice: the ensemble, then the network, then the forest.
TIE_ORDER = ("ensemble", "network", "forest")
#: Fewer held-out voxels than this give no usable estimate: nothing is held out.
MIN_HELD_OUT = 64


def holdout_bands(
    human: Mapping[int, tuple[np.ndarray, np.ndarray]],
    fraction: float,
    rotation: int,
) -> dict[int, np.ndarray]:
    """Which human voxels of each slice are held out for validation.

    Each slice's labelled rows are cut into ``round(1 / fraction)`` bands holding about
    equal numbers of human voxels; slice number ``j`` (in order) holds out band
    ``(rotation + j) % bands``. Where that leaves a class that humans labelled without a
    training voxel, or without a held-out one, the next rotations are tried: the first
    that keeps the most classes in training, then validates the most, is used (a class
    found in one band only is then never held out whole).

    Parameters
    ----------
    human : mapping of slice index -> (labels, mask)
        ``labels`` (H, W) integers (label contract on ``mask``), ``mask`` (H, W) bool:
        the voxels a human labelled.
    fraction : float
        In [0, 0.5]; 0 holds out nothing.
    rotation : int
        Which band (the round number plus the seed: successive rounds rotate).

    Returns
    -------
    dict of slice index -> (H, W) bool ndarray
        Held-out voxels (a subset of the slice's mask); empty when nothing is held out
        (``fraction`` 0, or fewer than :data:`MIN_HELD_OUT` voxels would be).
    """
    if not 0.0 <= fraction <= 0.5:
        raise ValueError(f"fraction must be in [0, 0.5], got {fraction!r}")
    if fraction == 0 or not human:
        return {}
    bands = max(2, int(round(1.0 / fraction)))
    slices = sorted(human)
    # Per slice, the band of each row: cumulative share of the slice's human voxels.
    row_band = {}
    for i in slices:
        per_row = human[i][1].sum(1)
        before = np.cumsum(per_row) - per_row
        row_band[i] = np.minimum((bands * before) // max(1, per_row.sum()), bands - 1)
    classes = np.unique(np.concatenate([human[i][0][human[i][1]] for i in slices]))
    best, best_rank = {}, None
    for attempt in range(bands):
        held = {}
        for j, i in enumerate(slices):
            band = (rotation + attempt + j) % bands
            held[i] = human[i][1] & (row_band[i] == band)[:, None]
        # Every class must keep training voxels first, then be validated where it can.
        trained, validated = _classes_on_each_side(human, held, classes)
        rank = (trained, validated)
        if best_rank is None or rank > best_rank:
            best, best_rank = held, rank
        if rank == (len(classes), len(classes)):
            break
    held = best
    if sum(int(m.sum()) for m in held.values()) < MIN_HELD_OUT:
        return {}
    return held


def _classes_on_each_side(human, held, classes) -> tuple[int, int]:
    """How many of ``classes`` keep training voxels, and how many have held-out ones."""
    trained = validated = 0
    for c in classes:
        validated += any(((human[i][0] == c) & held[i]).any() for i in held)
        trained += any(((human[i][0] == c) & human[i][1] & ~held[i]).any() for i in held)
    return trained, validated


def class_counts(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class, (overlap, predicted, true) voxel counts of two label arrays.

    Parameters
    ----------
    prediction, truth : integer ndarrays of one shape
        Label contract (0 = background); only the voxels given are counted.
    num_classes : int
        K (background included).

    Returns
    -------
    (K, 3) int64 ndarray
    """
    prediction, truth = np.ravel(prediction), np.ravel(truth)
    k = num_classes
    overlap = np.bincount(truth[prediction == truth], minlength=k)[:k]
    return np.stack(
        [overlap, np.bincount(prediction, minlength=k)[:k], np.bincount(truth, minlength=k)[:k]],
        axis=1,
    ).astype(np.int64)


def dice_scores(counts: np.ndarray) -> dict[str, float | dict[str, float] | None]:
    """Dice per foreground class and their mean, from :func:`class_counts`.

    A class neither predicted nor present on the held-out voxels is left out (no
    evidence either way); ``mean`` is None when every class is.

    Returns
    -------
    dict
        ``{"dice": {"1": 0.93, ...}, "mean": 0.93}``.
    """
    per_class = {}
    for c in range(1, len(counts)):
        overlap, predicted, true = (int(v) for v in counts[c])
        if predicted + true:
            per_class[str(c)] = 2.0 * overlap / (predicted + true)
    mean = round(float(np.mean(list(per_class.values()))), 5) if per_class else None
    return {"dice": {c: round(d, 5) for c, d in per_class.items()}, "mean": mean}


def candidate_name(source: str, bias: bool, vote: bool) -> str:
    """``"network"``, ``"forest+bias"``, ``"ensemble+bias+vote"``..."""
    return "+".join([source] + (["bias"] if bias else []) + (["vote"] if vote else []))


def choose(scores: Mapping[str, Mapping]) -> tuple[str, str]:
    """The candidate with the best mean validation Dice, and why, in one line.

    Ties go to the earlier source of :data:`TIE_ORDER`, then to the candidate with fewer
    post-processing steps (a step is kept only where it raises validation Dice).

    Parameters
    ----------
    scores : mapping of candidate name -> :func:`dice_scores` result
        Names from :func:`candidate_name`.
    """
    if not scores:
        raise ValueError("no candidate to choose from")

    def rank(name: str) -> tuple:
        mean = scores[name]["mean"]
        parts = name.split("+")
        return (-(mean if mean is not None else -1.0), TIE_ORDER.index(parts[0]), len(parts))

    best = min(scores, key=rank)
    mean = scores[best]["mean"]
    forest = max(
        (s["mean"] for n, s in scores.items() if n.startswith("forest") and s["mean"] is not None),
        default=None,
    )
    if mean is None:
        return best, "no class on the held-out voxels: nothing to tell the candidates apart"
    why = f"best held-out Dice {mean:.3f}"
    if forest is not None:
        why += f" (best forest {forest:.3f})"
    return best, why


def fit_round_forest(
    data: TrainingSet,
    *,
    held_out: bool,
    n_jobs: int,
    seed: int,
    settings: ForestSettings | None = None,
) -> PixelForest:
    """The pixel forest of a round, fitted on its human voxels.

    Parameters
    ----------
    data : TrainingSet
        Its ``image`` (normalised and smoothed as the network sees it) gives the
        features; its human voxels the labels.
    held_out : bool
        Also fit on the voxels held out for validation (after validation: the forest
        that predicts the volume learns from every human label).
    """
    from napari_ssl_seg.forest import fit_forest

    human = data.human_voxels(held_out=held_out)
    slices = [i for i in sorted(human) if human[i][1].any()]
    return fit_forest(
        (data.image[i] for i in slices),
        (human[i][0] for i in slices),
        (human[i][1] for i in slices),
        num_classes=data.num_classes,
        settings=settings,
        n_jobs=n_jobs,
        seed=seed,
    )


def validate_candidates(
    method: SSLMethod,
    forest: PixelForest,
    data: TrainingSet,
    *,
    mode: str,
    device: torch.device,
    background_bias: float,
    vote_window: tuple[int, int, int],
) -> dict[str, dict]:
    """Dice of every candidate output on the held-out human voxels of ``data``.

    For each held-out slice the sources (:data:`TIE_ORDER`) predict it and, where the vote
    reaches across slices, its neighbours (the vote then sees what it sees in the whole
    volume); each is scored with and without ``background_bias`` (when it is not 0) and
    the majority vote (when ``vote_window`` is larger than one voxel), exactly as
    :func:`napari_ssl_seg.inference.predict_into_round` would write it.

    Parameters
    ----------
    method : SSLMethod
        Trained on ``data`` (never on its held-out voxels).
    forest : PixelForest
        Fitted without the held-out voxels (:func:`fit_round_forest`).
    data : TrainingSet
        With ``held_out`` voxels.
    background_bias : float
        As calibrated on the training voxels.
    vote_window : (int, int, int)
        Odd widths (slices, rows, columns).

    Returns
    -------
    dict of candidate name -> :func:`dice_scores` result
    """
    import torch

    from napari_ssl_seg.inference import adjust_background, source_probabilities, vote_volume

    k, n = data.num_classes, data.image.shape[0]
    biases = [0.0, background_bias] if background_bias else [0.0]
    votes = [False, True] if any(w > 1 for w in vote_window) else [False]
    names = [
        (source, b, v, candidate_name(source, bool(b), v))
        for source in TIE_ORDER
        for b in biases
        for v in votes
    ]
    counts = {name: np.zeros((k, 3), np.int64) for *_, name in names}
    half, margin = vote_window[0] // 2, vote_window[1] // 2
    context = 1 if mode == "2.5d" else 0
    for s, (labels, held) in sorted(data.held_out.items()):
        # Only the held-out rows, and the vote's reach beyond them, are kept of each
        # predicted slice: a 2048^2 slice's probabilities are 16 MB per class and source.
        rows = np.flatnonzero(held.any(1))
        keep = slice(max(0, rows[0] - margin), rows[-1] + 1 + margin)
        lo, hi = max(0, s - half), min(n, s + half + 1)
        probs = {"network": [], "forest": []}
        for j in range(lo, hi):
            first = max(0, j - context)
            block = data.image[first : min(n, j + 1 + context)]
            own = np.array([j - first])
            for source, model in (("network", method), ("forest", forest)):
                p = source_probabilities(
                    source,
                    model if source == "network" else None,
                    model if source == "forest" else None,
                    block,
                    own,
                    mode=mode,
                    device=device,
                )
                probs[source].append(p[:, :, keep].cpu())
        probs = {source: torch.cat(parts) for source, parts in probs.items()}
        probs["ensemble"] = (probs["network"] + probs["forest"]) / 2
        band, truth = held[keep], labels[keep][held[keep]]
        for source, b, v, name in names:
            predicted = adjust_background(probs[source], b).argmax(1).numpy()
            if v:
                predicted = vote_volume(predicted, vote_window, num_classes=k)
            counts[name] += class_counts(predicted[s - lo][band], truth, k)
    return {name: dice_scores(c) for name, c in counts.items()}


__all__ = [
    "MIN_HELD_OUT",
    "TIE_ORDER",
    "candidate_name",
    "choose",
    "class_counts",
    "dice_scores",
    "fit_round_forest",
    "holdout_bands",
    "validate_candidates",
]


def validation_lines(record: dict) -> list[str]:
    """The round's validation estimate and what it wrote, in two lines.

    ``validation: 24.9% of the human voxels held out; Dice network 0.912, forest 0.930,
    ensemble 0.941`` (each source's best variant) and ``wrote ensemble+vote: best
    held-out Dice 0.941 (best forest 0.930); class 1 0.95, class 2 0.93``.
    """
    chosen, validation = record.get("chosen"), record.get("validation")
    if not chosen:  # rounds made before rounds were validated
        return []
    if not validation:
        return [f"wrote {chosen['candidate']} unvalidated ({chosen['why']})"]
    best: dict[str, float | None] = dict.fromkeys(("network", "forest", "ensemble"))
    for name, score in validation["candidates"].items():
        source, mean = name.split("+")[0], score["mean"]
        if mean is not None and (best.get(source) is None or mean > best[source]):
            best[source] = mean
    sources = ", ".join(f"{s} {'-' if m is None else f'{m:.3f}'}" for s, m in best.items())
    per_class = ", ".join(f"class {c} {d:.3f}" for c, d in chosen["dice"]["dice"].items())
    share = 100 * validation["held_out_fraction"]
    return [
        f"validation: {share:.1f}% of the human voxels held out; Dice {sources}",
        f"wrote {chosen['candidate']}: {chosen['why']}" + (f"; {per_class}" if per_class else ""),
    ]
