"""Segmentation metrics per class (MONAI): Dice, IoU, HD95 and average surface distance.

Label contract: 0 is background and 1..K-1 are classes; both volumes must have the same
shape. Distances are in voxels unless ``spacing`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_ssl_seg.errors import InvalidInputError
from napari_ssl_seg.labels import check_labels


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice (any class > 0), 1.0 when both are empty."""
    p, t = np.asarray(prediction) > 0, np.asarray(truth) > 0
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2 * (p & t).sum() / total)


def evaluate(
    prediction: np.ndarray,
    truth: np.ndarray,
    *,
    exclude_slices: Sequence[int] = (),
    axis: int = 0,
    spacing: Sequence[float] | None = None,
    distances: bool = True,
) -> dict[str, dict[str, float]]:
    """Per-class Dice, IoU, HD95 and ASD of ``prediction`` against ``truth``.

    Parameters
    ----------
    prediction, truth : (Z, Y, X) integer ndarray
        Label volumes of the same shape (0 = background, 1..K-1 = classes).
    exclude_slices : sequence of int
        Slices along ``axis`` left out (e.g. the annotated ones) before scoring.
    spacing : sequence of 3 floats, optional
        Voxel size for the distances; voxels when omitted.
    distances : bool
        Also compute HD95 and ASD (slower on big volumes).

    Returns
    -------
    dict
        ``{"class 1": {"dice": ..., "iou": ..., "hd95": ..., "asd": ...}, ...}`` and
        ``"mean"`` over the classes present in either volume.
    """
    import warnings

    import torch
    from monai.metrics import (
        DiceMetric,
        HausdorffDistanceMetric,
        MeanIoU,
        SurfaceDistanceMetric,
    )

    # MONAI 1.5+ warns about its own internal use of a deprecated argument.
    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    check_labels(prediction, name="prediction")
    check_labels(truth, shape=prediction.shape, name="truth")
    if exclude_slices:
        bad = [i for i in exclude_slices if not 0 <= i < truth.shape[axis]]
        if bad:
            raise InvalidInputError(f"exclude_slices {bad} outside 0..{truth.shape[axis] - 1}")
        keep = np.setdiff1d(np.arange(truth.shape[axis]), exclude_slices)
        prediction, truth = prediction.take(keep, axis), truth.take(keep, axis)
    classes = sorted(set(np.unique(truth)) | set(np.unique(prediction)) - {0})
    classes = [int(c) for c in classes if c != 0]
    out: dict[str, dict[str, float]] = {}
    for c in classes:
        p = torch.from_numpy(prediction == c)[None, None].float()
        t = torch.from_numpy(truth == c)[None, None].float()
        row = {
            "dice": float(DiceMetric(include_background=True)(p, t).item()),
            "iou": float(MeanIoU(include_background=True)(p, t).item()),
        }
        if distances:
            kw = {"spacing": list(spacing)} if spacing is not None else {}
            row["hd95"] = float(
                HausdorffDistanceMetric(include_background=True, percentile=95)(p, t, **kw).item()
            )
            row["asd"] = float(
                SurfaceDistanceMetric(include_background=True, symmetric=True)(p, t, **kw).item()
            )
        out[f"class {c}"] = row
    if out:
        keys = next(iter(out.values())).keys()
        out["mean"] = {k: float(np.nanmean([r[k] for r in out.values()])) for k in keys}
    return out
