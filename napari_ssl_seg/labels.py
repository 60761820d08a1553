"""The label contract and the checks that enforce it.

Label contract (repeated in every docstring that takes labels): labels are non-negative
integers; on annotated voxels 0 is background and 1..K-1 are classes. Which voxels are
annotated is recorded separately (a uint8 mask), so a voxel nobody annotated is never
taken for background.

Edit rule (:func:`apply_human_edit`, the one place it is written): for each voxel the most
recent human act wins - a stroke on either layer, an accepted slice, a mark - and a model
never outranks a human act. An annotation clears the correction mark of the voxels it
paints; a correction is recorded on top of the annotation. So wherever both marks are set
the correction is the newer act, and :func:`merge_labels` (corrections > annotations >
pseudo-labels) always shows the latest human act.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from napari_ssl_seg.errors import InvalidInputError

#: dtype of every stored label array (annotations, corrections, pseudo-labels, merged).
LABEL_DTYPE = np.uint16
#: Largest class label a label file may hold unless the caller allows more: a network
#: has one output per class up to the largest label, so an instance or intensity image
#: taken for labels would make thousands.
MAX_CLASSES = 255


def check_image(image, *, name: str = "image") -> None:
    """Check that ``image`` is a finite, numeric 3D volume.

    Parameters
    ----------
    image : (Z, Y, X) array-like
        Any object with ``shape`` and ``dtype``; floating data are scanned for NaN/inf
        block by block so a lazy array is never read whole.
    name : str
        What to call the array in error messages (a file name, say).

    Raises
    ------
    InvalidInputError
        Wrong number of dimensions, an empty axis, a non-numeric dtype, NaN or inf.
    """
    image = _as_array_like(image)
    shape, dtype = tuple(image.shape), np.dtype(image.dtype)
    if len(shape) != 3:
        raise InvalidInputError(
            f"{name}: expected a 3D volume (Z, Y, X), got {len(shape)} dimension(s) "
            f"with shape {shape}"
        )
    if min(shape) == 0:
        raise InvalidInputError(f"{name}: the volume is empty (shape {shape})")
    if dtype.kind not in "biuf":
        raise InvalidInputError(f"{name}: expected numeric voxels, got dtype {dtype}")
    if dtype.kind == "f":
        step = max(1, 2**24 // max(1, shape[1] * shape[2]))
        for start in range(0, shape[0], step):
            block = np.asarray(image[start : start + step])
            if not np.isfinite(block).all():
                bad = "NaN" if np.isnan(block).any() else "inf"
                raise InvalidInputError(
                    f"{name}: the image holds {bad} values (first in slices "
                    f"{start}..{min(start + step, shape[0]) - 1}); clean or mask them first"
                )


def check_labels(
    labels,
    *,
    shape: Sequence[int] | None = None,
    name: str = "labels",
    max_classes: int | None = None,
) -> None:
    """Check ``labels`` against the label contract.

    Parameters
    ----------
    labels : (Z, Y, X) array-like
        Non-negative integers; 0 = background on annotated voxels, 1..K-1 = classes.
    shape : sequence of int, optional
        The image shape the labels must match.
    name : str
        What to call the array in error messages.
    max_classes : int, optional
        Largest label allowed (:data:`MAX_CLASSES` where a label file is imported);
        None checks only what the stored uint16 holds.

    Raises
    ------
    InvalidInputError
        Float or non-integer dtype, negative values, a shape that is not ``shape``,
        values too large for the stored uint16, or a label above ``max_classes`` (the
        message counts the distinct values: an instance or intensity image, likely).
    """
    if max_classes is not None and (
        isinstance(max_classes, bool)
        or not isinstance(max_classes, (int, np.integer))
        or max_classes < 1
    ):
        raise InvalidInputError(f"max_classes must be an integer >= 1, got {max_classes!r}")
    labels = _as_array_like(labels)
    lshape, dtype = tuple(labels.shape), np.dtype(labels.dtype)
    if dtype.kind == "b":
        return _check_shape(lshape, shape, name)
    if dtype.kind not in "iu":
        raise InvalidInputError(
            f"{name}: labels must be integers (0 = background, 1..K-1 = classes), "
            f"got dtype {dtype}"
        )
    _check_shape(lshape, shape, name)
    arr = np.asarray(labels)
    if arr.size and dtype.kind == "i" and arr.min() < 0:
        raise InvalidInputError(
            f"{name}: labels must be >= 0, found {int(arr.min())} "
            "(unannotated voxels are recorded separately, not with negative values)"
        )
    high = int(arr.max()) if arr.size else 0
    if high > np.iinfo(LABEL_DTYPE).max:
        raise InvalidInputError(f"{name}: label {high} is larger than {np.iinfo(LABEL_DTYPE).max}")
    if max_classes is not None and high > max_classes:
        # Counted only here: np.unique sorts the volume, too slow for every import.
        distinct = len(np.unique(arr))
        raise InvalidInputError(
            f"{name}: looks like an instance image or an intensity image: {distinct} "
            f"distinct values / max label {high}; convert it to classes 0..K-1 or pass "
            f"--max-classes (max_classes= in Python; now {max_classes})"
        )


def _as_array_like(obj):
    # Not ``getattr(obj, "dtype", np.asarray(obj).dtype)``: that default is evaluated
    # even when ``obj`` has a dtype, which reads a lazy (zarr, dask, tifffile) volume whole.
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return obj
    return np.asarray(obj)


def _check_shape(lshape: tuple, shape: Sequence[int] | None, name: str) -> None:
    if shape is not None and lshape != tuple(shape):
        raise InvalidInputError(
            f"{name}: shape {lshape} does not match the image shape {tuple(shape)}"
        )


def labelled_slices(labels: np.ndarray, axis: int = 0) -> list[int]:
    """Indices along ``axis`` of the slices that hold at least one non-zero label."""
    other = tuple(a for a in range(labels.ndim) if a != axis)
    return [int(i) for i in np.flatnonzero(np.asarray(labels).any(axis=other))]


def parse_slice_list(text: str, *, length: int, name: str = "slices") -> list[int]:
    """Parse "3,17,40" or "3-5,9" into sorted unique slice indices in ``[0, length)``."""
    out: set[int] = set()
    outside: set[int] = set()
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        try:
            if "-" in part[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
            else:
                lo = hi = int(part)
        except ValueError:
            raise InvalidInputError(
                f"{name}: {part!r} is not a slice index (expected e.g. '3,17,40' or '3-5')"
            ) from None
        # Ends checked before expanding, so a typo like '0-10000000000' fails at once.
        bad = {b for b in (lo, hi) if not 0 <= b < length}
        if bad:
            outside |= bad
            continue
        if lo > hi:
            raise InvalidInputError(f"{name}: range {part!r} runs backwards; write '{hi}-{lo}'")
        out.update(range(lo, hi + 1))
    if outside:
        raise InvalidInputError(f"{name}: slice(s) {sorted(outside)} outside 0..{length - 1}")
    if not out:
        raise InvalidInputError(f"{name}: no slice given")
    return sorted(out)


def merge_labels(
    pseudo: np.ndarray | None,
    annotations: np.ndarray,
    annotated: np.ndarray,
    corrections: np.ndarray,
    corrected: np.ndarray,
) -> np.ndarray:
    """Merge a block of labels: corrections > annotations > pseudo-labels.

    The edit rule (:func:`apply_human_edit`) keeps a correction mark only where the
    correction is newer than the annotation, so this order shows the latest human act.
    All arguments are blocks of the same shape: ``annotated`` is the uint8 mask of
    annotated voxels, ``corrected`` the uint16 round a voxel was corrected in (0 = never).
    Where nobody annotated and no round exists yet, the result is 0.
    """
    out = (
        np.zeros(annotations.shape, LABEL_DTYPE)
        if pseudo is None
        else np.asarray(pseudo, LABEL_DTYPE).copy()
    )
    ann = np.asarray(annotated) > 0
    out[ann] = np.asarray(annotations)[ann]
    cor = np.asarray(corrected) > 0
    out[cor] = np.asarray(corrections)[cor]
    return out


class HumanState(NamedTuple):
    """What humans said about a block of voxels (all arrays of one shape).

    Attributes
    ----------
    annotations : uint16 ndarray
        Annotated labels (label contract above); meaningful where ``annotated``.
    annotated : uint8 ndarray
        1 where a human annotated the voxel.
    corrections : uint16 ndarray
        Corrected labels; meaningful where ``corrected``.
    corrected : uint16 ndarray
        The round whose pseudo-labels the human corrected there (0 = none).
    """

    annotations: np.ndarray
    annotated: np.ndarray
    corrections: np.ndarray
    corrected: np.ndarray

    def copy(self) -> HumanState:
        return HumanState(*(np.array(a, copy=True) for a in self))

    def changed(self, other: HumanState) -> np.ndarray:
        """Bool mask of the voxels where ``other`` says something else than ``self``."""
        out = np.zeros(self.annotated.shape, bool)
        for a, b in zip(self, other, strict=True):
            out |= np.asarray(a) != np.asarray(b)
        return out


def apply_human_edit(
    state: HumanState,
    kind: str,
    values: np.ndarray | None,
    mask: np.ndarray,
    *,
    round: int = 0,
    whole_slices_axis: int | None = None,
) -> HumanState:
    """The edit rule: the human state of a block after one human act (a new state).

    Parameters
    ----------
    state : HumanState
        The block before the act.
    kind : {"annotation", "unannotation", "correction"}
        "annotation" paints human labels (and takes precedence over any earlier
        correction of those voxels); "unannotation" forgets every human label of the
        masked voxels (annotations and corrections: they are "not annotated" again);
        "correction" records corrected labels of round ``round`` (>= 1).
    values : uint16 ndarray or None
        The new labels (label contract above); not used by "unannotation".
    mask : bool ndarray
        The voxels the act touched.
    whole_slices_axis : int, optional
        For "annotation": every slice along this axis that the mask touches becomes fully
        annotated, its voxels nobody labelled before becoming background (what painting
        a slice means). Voxels already labelled by a human keep their labels there.
    """
    out = state.copy()
    mask = np.asarray(mask, bool)
    if kind == "annotation":
        out.annotations[mask] = values[mask]
        out.annotated[mask] = 1
        out.corrected[mask] = 0  # this stroke is newer than any correction there
        if whole_slices_axis is not None:
            other = tuple(a for a in range(mask.ndim) if a != whole_slices_axis)
            rows = mask.any(axis=other)
            along = [slice(None)] * mask.ndim
            along[whole_slices_axis] = rows
            rest = np.zeros(mask.shape, bool)
            rest[tuple(along)] = True
            rest &= (out.annotated == 0) & (out.corrected == 0)
            out.annotations[rest] = 0
            out.annotated[rest] = 1
    elif kind == "unannotation":
        for array in out:
            array[mask] = 0
    elif kind == "correction":
        out.corrections[mask] = values[mask]
        out.corrected[mask] = round
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    return out
