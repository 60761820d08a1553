"""What the annotation widget does to a project, without Qt or napari.

The widget (``_widget.py``) wires layers and buttons to these functions; everything that
can be tested without a display lives here:

* where a volume's project lives (:func:`default_project_path`, :func:`open_or_create`);
* napari paint history items → touched regions (:func:`atom_region`, :class:`EditBuffer`);
* human edits written to the project (:class:`AnnotationSession`);
* widget settings kept in the project (:func:`load_settings`, :func:`save_settings`,
  :func:`build_config`);
* export of the result (:func:`export_labels`).

Label contract: labels are non-negative integers; on annotated voxels 0 is background and
1..K-1 are classes. Which voxels are annotated is recorded by the project, so a voxel
nobody annotated is never taken for background.

Undo: napari's Labels undo and redo write the layer without a paint event. The widget
feeds the undone (or redone) history item to the same :class:`EditBuffer`; at the next
flush those voxels are recorded again with the values they have then, i.e. the restored
ones. The edit log therefore keeps both the stroke and its undoing.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from napari_ssl_seg.config import PRESETS, TrainConfig
from napari_ssl_seg.errors import InvalidInputError
from napari_ssl_seg.store import Edit, Project, _atomic_write_bytes

__all__ = [
    "OpenedProject",
    "Pending",
    "item_key",
    "open_project_state",
    "DEVICES",
    "AnnotationSession",
    "EditBuffer",
    "Saved",
    "atom_region",
    "covered_mask",
    "build_config",
    "default_project_path",
    "check_export_path",
    "export_labels",
    "format_slices",
    "load_settings",
    "open_or_create",
    "save_settings",
]

PROJECT_SUFFIX = ".ssl.zarr"
SETTINGS_FILE = "widget.json"
DEVICES = ("auto", "cpu", "cuda")
EXPORT_FORMATS = (".tif", ".nii.gz", ".ome.zarr")
_KNOWN_SUFFIXES = (
    ".ssl.zarr",
    ".ome.zarr",
    ".ome.tiff",
    ".ome.tif",
    ".nii.gz",
    ".nii",
    ".tiff",
    ".tif",
    ".zarr",
)

Region = tuple[slice, ...]


# ----------------------------------------------------------------------- projects
def default_project_path(
    source: str | os.PathLike | None = None,
    *,
    name: str = "volume",
    directory: str | os.PathLike | None = None,
) -> Path:
    """Where the project of a volume lives unless the user picks a place.

    Parameters
    ----------
    source : path-like, optional
        The file (or Zarr directory) the volume was read from. A project directory is its
        own project; ``cells.tif`` gets ``cells.ssl.zarr`` beside it.
    name : str
        Layer name, used when there is no ``source`` (unsafe characters become ``_``).
    directory : path-like, optional
        Folder for volumes without a file: ``<directory>/<name>.ssl.zarr``.

    Raises
    ------
    ValueError
        Neither ``source`` nor ``directory`` given.
    """
    from napari_ssl_seg._reader import is_project

    if source:
        source = Path(source)
        if is_project(source):
            return source
        lower = source.name.lower()
        stem = (
            next(
                (source.name[: -len(s)] for s in _KNOWN_SUFFIXES if lower.endswith(s)), source.stem
            )
            or source.name
        )
        return source.with_name(stem + PROJECT_SUFFIX)
    if directory is None:
        raise ValueError(
            "the volume has no file: pass directory= (the folder for its project), "
            f"got source={source!r}"
        )
    safe = re.sub(r"[^\w.-]+", "_", str(name)).strip("._") or "volume"
    return Path(directory) / (safe + PROJECT_SUFFIX)


def open_or_create(
    path: str | os.PathLike,
    image,
    *,
    voxel_size: Sequence[float] | None = None,
    source: str = "",
    check_image: bool = True,
    axis: int = 0,
) -> tuple[Project, bool]:
    """Open the project at ``path``, or create it for ``image``; returns ``(project, created)``.

    Parameters
    ----------
    image : (Z, Y, X) array-like
        The volume. An existing project must have been made for it (same signature)
        unless ``check_image`` is False (the image *is* the project's own array).
    axis : {0, 1, 2}
        The slice axis of a new project; an existing project keeps its own.

    Raises
    ------
    ProjectError, SignatureMismatchError, InvalidInputError
        As :meth:`Project.open` and :meth:`Project.create`; the messages name the path.
    """
    path = Path(path)
    if path.exists():
        return Project.open(path, image=image if check_image else None), False
    return Project.create(path, image, axis=axis, voxel_size=voxel_size, source=source), True


def import_annotations(
    project: Project, labels, *, slices: Iterable[int] | None = None, source: str = "widget"
) -> list[int]:
    """Annotate the slices of ``labels`` that are not annotated in ``project`` yet.

    For a Labels layer painted before its project existed (the bundled sample ships
    one).

    Parameters
    ----------
    labels : (Z, Y, X) integer array
        The project's shape. Label contract above.
    slices : iterable of int, optional
        The slices that count as annotated, empty ones included (default: those holding
        any label; an annotated empty slice cannot be told from an unannotated one).

    Returns
    -------
    list of int
        The slices imported.
    """
    from napari_ssl_seg.labels import check_labels, labelled_slices

    check_labels(labels, shape=project.shape, name="annotation layer")
    known = set(project.annotated_slices())
    if slices is None:
        slices = labelled_slices(np.asarray(labels), project.axis)
    slices = sorted({int(i) for i in slices})
    bad = [i for i in slices if not 0 <= i < project.n_slices]
    if bad:
        raise InvalidInputError(f"slices {bad} are outside 0..{project.n_slices - 1}")
    new = [i for i in slices if i not in known]
    if new:
        project.annotate_slices(labels, new, source=source)
    return new


# -------------------------------------------------------------- paint → regions
def atom_region(atom: Any, shape: Sequence[int]) -> tuple[Region, np.ndarray] | None:
    """Bounding box and mask of the voxels one napari paint-history atom changed.

    napari writes three kinds of atoms into a Labels history item:

    * a masked atom (napari >= 0.9, brush/fill/polygon) with ``slice_key`` (the box)
      and ``mask`` (changed voxels, or None when the whole box changed);
    * ``(tuple of slices, old box, new box)`` (brush in napari 0.5-0.8);
    * ``(tuple of coordinate arrays, old values, new values)`` (``data_setitem``).

    Parameters
    ----------
    atom : one of the above
    shape : sequence of int
        The layer's data shape.

    Returns
    -------
    (region, mask) or None
        ``region`` is a tuple of slices with explicit bounds, ``mask`` a bool array of
        the region's shape; None when the atom changed nothing.
    """
    shape = tuple(int(n) for n in shape)
    if hasattr(atom, "slice_key"):
        region = _bounded(atom.slice_key, shape)
        box = tuple(s.stop - s.start for s in region)
        mask = np.ones(box, bool) if atom.mask is None else np.asarray(atom.mask, bool)
        return _checked(region, mask.reshape(box))
    index, old, new = atom
    if isinstance(index, tuple) and all(isinstance(s, slice) for s in index):
        region = _bounded(index, shape)
        box = tuple(s.stop - s.start for s in region)
        old, new = np.asarray(old), np.asarray(new)
        mask = (old != new) if old.shape == box and new.shape == box else np.ones(box, bool)
        return _checked(region, mask)
    coords = np.broadcast_arrays(*(np.atleast_1d(np.asarray(c, np.int64)) for c in index))
    if len(coords) != len(shape):
        raise ValueError(f"paint atom has {len(coords)} index arrays for data of {len(shape)}D")
    coords = [c.ravel() % n for c, n in zip(coords, shape, strict=True)]
    if coords[0].size == 0:
        return None
    lo = [int(c.min()) for c in coords]
    region = tuple(slice(a, int(c.max()) + 1) for a, c in zip(lo, coords, strict=True))
    mask = np.zeros(tuple(s.stop - s.start for s in region), bool)
    mask[tuple(c - a for c, a in zip(coords, lo, strict=True))] = True
    return region, mask


def _bounded(index: Sequence[slice], shape: tuple[int, ...]) -> Region:
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, _ = s.indices(n) if isinstance(s, slice) else (int(s), int(s) + 1, 1)
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def _checked(region: Region, mask: np.ndarray) -> tuple[Region, np.ndarray] | None:
    return (region, mask) if mask.size and mask.any() else None


def item_key(item: Iterable[Any]) -> frozenset[int]:
    """Identity of a napari paint-history item: its atoms, which undo and redo move between
    the layer's history deques as they are (the item list itself is rebuilt)."""
    return frozenset(id(atom) for atom in item)


class Pending(NamedTuple):
    """A box of voxels one history item changed, waiting to be written.

    ``seq`` orders the items of both layers as the human made them; ``key`` is
    :func:`item_key` of the item.
    """

    seq: int
    key: frozenset
    region: Region
    mask: np.ndarray


class EditBuffer:
    """Paint-history items waiting to be written, merged into few boxes at :meth:`take`.

    Adding is cheap (the atom's box and mask only, never the volume); touching boxes of
    one item (one brush drag) are merged when taken, so a flush writes one edit per
    painted area rather than one per brush dab, never the whole volume, and an undo of
    one item can take back exactly its edits.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(n) for n in shape)
        self._boxes: list[Pending] = []
        self._seq = 0

    def add(self, item: Iterable[Any], *, seq: int | None = None) -> None:
        """Add one history item (a list of atoms, as in ``Labels.events.paint``)."""
        item = list(item)
        key = item_key(item)
        if seq is None:
            self._seq += 1
            seq = self._seq
        for atom in item:
            box = atom_region(atom, self.shape)
            if box is not None:
                self._boxes.append(Pending(seq, key, *box))

    def discard(self, key: frozenset) -> bool:
        """Drop the boxes of the item ``key``; True if it was pending."""
        kept = [b for b in self._boxes if b.key != key]
        found = len(kept) < len(self._boxes)
        self._boxes = kept
        return found

    def pending_mask(self, region: Region) -> np.ndarray:
        """Bool mask (the shape of ``region``) of the voxels waiting to be written there."""
        return covered_mask(self._boxes, region)

    def boxes(self) -> list[Pending]:
        """The pending boxes (a copy of the list; the buffer keeps them)."""
        return list(self._boxes)

    def __len__(self) -> int:
        return len(self._boxes)

    def take(self) -> list[Pending]:
        """The pending boxes (touching boxes of one item merged); empties the buffer."""
        boxes, self._boxes = self._boxes, []
        by_item: dict[frozenset, list[Pending]] = {}
        for box in boxes:
            by_item.setdefault(box.key, []).append(box)
        out = []
        for group in by_item.values():
            for part in _touching_groups([box.region for box in group]):
                members = [group[k] for k in part]
                region, mask = _union(members)
                out.append(Pending(members[0].seq, members[0].key, region, mask))
        return sorted(out, key=lambda box: box.seq)


def _touching_groups(regions: Sequence[Region]) -> list[list[int]]:
    """Indices of ``regions`` grouped by touching (transitively), each in input order.

    A brush drag leaves hundreds of dabs: the pairs are tested at once with numpy.
    """
    if len(regions) == 1:
        return [[0]]
    start = np.array([[s.start for s in r] for r in regions])
    stop = np.array([[s.stop for s in r] for r in regions])
    touch = ((start[:, None] <= stop[None]) & (start[None] <= stop[:, None])).all(axis=2)
    group = list(range(len(regions)))  # union-find over the touching pairs

    def root(k: int) -> int:
        while group[k] != k:
            group[k] = group[group[k]]
            k = group[k]
        return k

    for a, b in zip(*np.nonzero(np.triu(touch, 1)), strict=True):
        group[root(int(a))] = root(int(b))
    parts: dict[int, list[int]] = {}
    for k in range(len(regions)):
        parts.setdefault(root(k), []).append(k)
    return list(parts.values())


def covered_mask(boxes: Iterable[Pending], region: Region) -> np.ndarray:
    """Bool mask (the shape of ``region``) of the voxels of ``boxes`` that lie in it."""
    out = np.zeros(tuple(s.stop - s.start for s in region), bool)
    for box in boxes:
        lo = [max(b.start, r.start) for b, r in zip(box.region, region, strict=True)]
        hi = [min(b.stop, r.stop) for b, r in zip(box.region, region, strict=True)]
        if all(a < b for a, b in zip(lo, hi, strict=True)):
            inside = tuple(
                slice(a - r.start, b - r.start) for a, b, r in zip(lo, hi, region, strict=True)
            )
            part = tuple(
                slice(a - q.start, b - q.start) for a, b, q in zip(lo, hi, box.region, strict=True)
            )
            out[inside] |= box.mask[part]
    return out


def _union(parts: Sequence[Pending]) -> tuple[Region, np.ndarray]:
    """Bounding box of ``parts`` and the union of their masks in it."""
    if len(parts) == 1:
        return parts[0].region, parts[0].mask
    region = _bounding_box([p.region for p in parts])
    mask = np.zeros(tuple(s.stop - s.start for s in region), bool)
    for part in parts:
        mask[_inner(part.region, region)] |= part.mask
    return region, mask


def _bounding_box(regions: Iterable[Region]) -> Region:
    regions = list(regions)
    return tuple(
        slice(min(r[a].start for r in regions), max(r[a].stop for r in regions))
        for a in range(len(regions[0]))
    )


def _inner(box: Region, outer: Region) -> Region:
    """``box`` in the coordinates of ``outer`` (which contains it)."""
    return tuple(
        slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer, strict=True)
    )


# ------------------------------------------------------------------------ session
@dataclass
class Saved:
    """What one flush wrote.

    Attributes
    ----------
    edits : list of Edit
        The logged edits, in order.
    merged : list of (region, ndarray)
        For every slice an annotation edit touched (whole slices along the project
        axis): the merged labels there, human labels on top of round ``merged_round``,
        so that a merged-labels layer can show them. Empty without ``merged_round``.
    """

    edits: list[Edit] = field(default_factory=list)
    merged: list[tuple[Region, np.ndarray]] = field(default_factory=list)


class AnnotationSession:
    """The human side of a project: buffered strokes, slice marks, accepted slices.

    Parameters
    ----------
    project : Project
        Opened by the process that owns the human edits (``recover=True``).
    source : str
        Provenance written with every edit.
    background : bool
        Give :meth:`flush_async` a writer thread. Every write goes through that one
        thread or waits for it, so edits keep their order and ids.

    Attributes
    ----------
    annotations, corrections : EditBuffer
        Strokes on the annotation layer and on the pseudo-label layer, not yet written.
    """

    def __init__(
        self, project: Project, *, source: str = "widget", background: bool = False
    ) -> None:
        self.project = project
        self.source = source
        self.annotations = EditBuffer(project.shape)
        self.corrections = EditBuffer(project.shape)
        self._lock = threading.Lock()
        self._annotated: set[int] = set(project.annotated_slices())
        self._corrected: set[int] = set(project.corrected_slices())
        self._seq = 0  # orders strokes and undos of both layers as the human made them
        self._undos: list[tuple[int, str, frozenset, list]] = []
        # (kind, item key) -> (seq, edit ids) of the written strokes, for undo.
        self._edits_of: dict[tuple[str, frozenset], tuple[int, list[int]]] = {}
        self._reverted: set[tuple[str, frozenset]] = set()  # items whose edits were reverted
        self._failed: list[tuple[tuple, int]] = []  # (job, round) a failed write left
        # Strokes several items share one edit: each edit's items, with their boxes while
        # napari can still undo them (its history keeps 100 items per layer).
        self._members: dict[int, list[_Member]] = {}
        self._queued: list[tuple[list, int, int | None, Future]] = []  # for the writer
        self._writer = (
            ThreadPoolExecutor(1, thread_name_prefix="napari-ssl-seg-writer")
            if background
            else None
        )

    @property
    def annotated(self) -> frozenset[int]:
        """Slices (along the project axis) holding annotated voxels, as written so far."""
        with self._lock:
            return frozenset(self._annotated)

    @property
    def corrected(self) -> frozenset[int]:
        """Slices holding human-corrected voxels, as written so far."""
        with self._lock:
            return frozenset(self._corrected)

    @property
    def pending(self) -> bool:
        """True while strokes wait in a buffer (not counting background writes)."""
        return bool(len(self.annotations) or len(self.corrections) or self._undos or self._failed)

    def add_stroke(self, kind: str, item: Iterable[Any]) -> None:
        """Buffer a napari history item painted (or redone) on the ``kind`` layer.

        Parameters
        ----------
        kind : {"annotation", "correction"}
        item : list of paint atoms
        """
        self._seq += 1
        self._buffer(kind).add(item, seq=self._seq)

    def add_undo(self, kind: str, item: Iterable[Any]) -> None:
        """A history item of the ``kind`` layer was undone: take back what it recorded.

        Still buffered: it is dropped and nothing is written. Written already: the next
        flush reverts its edits (:meth:`Project.revert_edits`), so a slice the stroke
        annotated is unannotated again and the marks it replaced come back. An item this
        session never wrote (painted before the project was opened) is recorded with its
        restored values, as a stroke that does not annotate whole slices.
        """
        item = list(item)
        buffer = self._buffer(kind)
        if buffer.discard(item_key(item)):
            return
        self._seq += 1
        boxes = [box for box in (atom_region(a, buffer.shape) for a in item) if box is not None]
        self._undos.append((self._seq, kind, item_key(item), boxes))

    def _buffer(self, kind: str) -> EditBuffer:
        if kind not in ("annotation", "correction"):
            raise ValueError(f"kind must be 'annotation' or 'correction', got {kind!r}")
        return self.annotations if kind == "annotation" else self.corrections

    @property
    def has_human_labels(self) -> bool:
        with self._lock:
            return bool(self._annotated or self._corrected)

    # ---------------------------------------------------------------- strokes
    def flush(
        self,
        annotation_data=None,
        correction_data=None,
        *,
        round: int = 0,
        merged_round: int | None = None,
    ) -> Saved:
        """Write the buffered strokes now; corrections first, annotations second.

        Parameters
        ----------
        annotation_data, correction_data : (Z, Y, X) integer ndarray, optional
            The layers' data: only the touched boxes are read. Label contract above.
            A buffer whose data is None is left pending.
        round : int
            The round the corrected pseudo-labels came from (>= 1 when corrections are
            pending).
        merged_round : int, optional
            Return the merged labels of annotated slices against this round.

        Returns
        -------
        Saved
            Annotation edits mark every touched slice as fully annotated.
        """
        self.wait()
        return self._write(self._snapshot(annotation_data, correction_data), round, merged_round)

    def flush_async(
        self,
        annotation_data=None,
        correction_data=None,
        *,
        round: int = 0,
        merged_round: int | None = None,
    ) -> Future:
        """As :meth:`flush`, but write in the writer thread; returns a Future of Saved.

        The touched boxes are copied now, so later strokes cannot leak into this write.
        """
        if self._writer is None:
            raise RuntimeError("this AnnotationSession has no writer thread (background=False)")
        future: Future = Future()
        with self._lock:
            self._queued.append(
                (self._snapshot(annotation_data, correction_data), round, merged_round, future)
            )
        self._writer.submit(self._drain)
        return future

    def _drain(self) -> None:
        """Write everything queued by :meth:`flush_async` so far, as few edits as it can.

        Strokes queued while the writer was busy are written together: a brush that
        outpaces the disk makes fewer, larger edits instead of a growing queue.
        """
        with self._lock:
            entries, self._queued = self._queued, []
        while entries:
            round, merged_round = entries[0][1], entries[0][2]
            n = next(
                (k for k, e in enumerate(entries) if (e[1], e[2]) != (round, merged_round)),
                len(entries),
            )
            group, entries = entries[:n], entries[n:]
            try:
                saved = self._write([j for e in group for j in e[0]], round, merged_round)
            except BaseException as err:
                with self._lock:  # kept, with their rounds, for the next flush
                    self._failed += [(job, e[1]) for e in entries for job in e[0]]
                for entry in group + entries:
                    entry[3].set_exception(err)
                return
            for entry in group[:-1]:
                entry[3].set_result(Saved())
            group[-1][3].set_result(saved)

    def round_labels_async(self, r: int) -> Future:
        """Refresh ``final`` and merge round ``r``'s labels in the writer thread.

        Returns a Future of the merged (Z, Y, X) uint16 labels (human labels on top). On
        a large volume this is seconds of reading and writing: off the GUI thread, and in
        the writer thread so it is ordered with the human edits that also write ``final``.
        """

        def work() -> np.ndarray:
            self.project.refresh_final()
            return self.project.merged_labels(r)

        if self._writer is None:
            future: Future = Future()
            future.set_result(work())
            return future
        return self._writer.submit(work)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every background write submitted so far is done."""
        if self._writer is not None:
            self._writer.submit(lambda: None).result(timeout)

    def close(self) -> None:
        """Finish the background writes and stop the writer thread."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _snapshot(self, annotation_data, correction_data) -> list[tuple]:
        """Copy the touched boxes now: ``(seq, kind, key, region, values, mask, undo)`` jobs
        in the order the human made them. A layer whose data is None stays pending."""
        data = {"annotation": annotation_data, "correction": correction_data}
        jobs = []
        for kind, buffer in (("correction", self.corrections), ("annotation", self.annotations)):
            if data[kind] is not None:
                jobs += [
                    (b.seq, kind, b.key, b.region, np.array(data[kind][b.region]), b.mask, False)
                    for b in buffer.take()
                ]
        undos, self._undos = self._undos, []
        for seq, kind, key, boxes in undos:
            if data[kind] is None:
                self._undos.append((seq, kind, key, boxes))
                continue
            jobs += [
                (seq, kind, key, region, np.array(data[kind][region]), mask, True)
                for region, mask in boxes
            ] or [(seq, kind, key, None, None, None, True)]
        return sorted(jobs, key=lambda job: job[0])

    def _write(self, jobs: list[tuple], round: int, merged_round: int | None) -> Saved:
        """Write ``jobs`` (after those a failed write left); a job that fails, and those
        after it, are kept with their values to be written first by the next flush.

        Consecutive strokes of one layer and round are written as one edit per set of
        slices they share (:func:`_stroke_units`), not one per history item.
        """
        with self._lock:
            queued = [(job, round) for job in jobs]
            queued[:0], self._failed = self._failed, []
        saved = Saved()
        units = _stroke_units(queued, self.project.axis)
        for k, unit in enumerate(units):
            try:
                if unit[0][0][6]:  # an undo
                    self._write_undo([job for job, _ in unit], unit[0][1], merged_round, saved)
                else:
                    self._write_strokes([job for job, _ in unit], unit[0][1], merged_round, saved)
            except BaseException:
                with self._lock:
                    self._failed[:0] = [entry for u in units[k:] for entry in u]
                raise
        return saved

    def _write_strokes(
        self, jobs: list[tuple], round: int, merged_round: int | None, saved: Saved
    ) -> None:
        """One edit for strokes of one layer (``(seq, kind, key, region, values, mask,
        False)`` jobs in the order made): later strokes win where they overlap."""
        kind = jobs[0][1]
        region = _bounding_box([job[3] for job in jobs])
        box = tuple(s.stop - s.start for s in region)
        values = np.zeros(box, np.asarray(jobs[0][4]).dtype)
        mask = np.zeros(box, bool)
        for _, _, _, part, part_values, part_mask, _ in jobs:
            inner = _inner(part, region)
            values[inner] = np.where(part_mask, part_values, values[inner])
            mask[inner] |= part_mask
        edit = self.project.apply_edit(
            kind,
            region,
            values,
            mask,
            round=round if kind == "correction" else 0,
            source=self.source,
            whole_slices=kind == "annotation",
        )
        members = [_Member(job[0], job[2], round, job[3], job[4], job[5]) for job in jobs]
        with self._lock:
            self._members[edit.id] = members
            for member in members:
                known = self._edits_of.get((kind, member.key))
                ids = known[1] if known is not None and known[0] == member.seq else []
                if edit.id not in ids:
                    self._edits_of[(kind, member.key)] = (member.seq, ids + [edit.id])
                self._reverted.discard((kind, member.key))
            self._forget_old_members()
        other = tuple(a for a in range(mask.ndim) if a != self.project.axis)
        hit = {int(i) + region[self.project.axis].start for i in np.flatnonzero(mask.any(other))}
        self._record(edit, kind, merged_round, saved, shows_merge=kind == "annotation", slices=hit)

    def _write_undo(
        self, jobs: list[tuple], round: int, merged_round: int | None, saved: Saved
    ) -> None:
        """An undone item (its undo jobs, one per box): revert the edits it was written
        in, then write again the other items those edits held, so that exactly its
        voxels go back."""
        _, kind, key = jobs[0][:3]
        boxes = [job for job in jobs if job[3] is not None]
        written = self._edits_of.get((kind, key))
        if written is None:
            if (kind, key) not in self._reverted:  # else: reverted already
                # Painted before this session: recorded with its restored values.
                for job in boxes:
                    self._record(
                        self._restore(job, round), kind, merged_round, saved, shows_merge=True
                    )
            return
        ids = written[1]
        others = [m for i in ids for m in self._members.get(i, []) if m.key != key]
        if any(m.values is None for m in others):
            # The other items are beyond napari's history: reverting would take them too.
            for job in boxes:
                self._record(
                    self._restore(job, round), kind, merged_round, saved, shows_merge=True
                )
            return
        edit = self.project.revert_edits(ids, source=self.source)
        with self._lock:
            del self._edits_of[(kind, key)]
            self._reverted.add((kind, key))
            for i in ids:
                self._members.pop(i, None)
            for member in others:  # these edits are gone: the items are rewritten below
                known = self._edits_of.get((kind, member.key))
                if known is not None:
                    kept = [i for i in known[1] if i not in ids]
                    self._edits_of[(kind, member.key)] = (known[0], kept)
        self._record(edit, kind, merged_round, saved, shows_merge=True)
        others = sorted({(m.seq, m.key): m for m in others}.values(), key=lambda m: m.seq)
        # The layer after the undo, in the undone item's boxes, holds what the earlier
        # items left there: where they overlap it, that is what they are written with.
        restored = [(job[3], job[4], job[5]) for job in boxes]
        others = [m._replace(values=_overlaid(m.values, m.region, restored)) for m in others]
        for unit in _stroke_units(
            [((m.seq, kind, m.key, m.region, m.values, m.mask, False), m.round) for m in others],
            self.project.axis,
        ):
            self._write_strokes([job for job, _ in unit], unit[0][1], merged_round, saved)

    def _restore(self, job: tuple, round: int) -> Edit:
        """Record an undone item's restored values as a stroke that marks no whole slice."""
        _, kind, _, region, values, mask, _ = job
        return self.project.apply_edit(
            kind,
            region,
            values,
            mask,
            round=round if kind == "correction" else 0,
            source=self.source,
        )

    def _record(
        self,
        edit: Edit,
        kind: str,
        merged_round: int | None,
        saved: Saved,
        *,
        shows_merge: bool,
        slices: set[int] | None = None,
    ) -> None:
        """Note a written edit: which slices are annotated and corrected now, and the
        merged labels it changed (whole slices where it annotated a new slice).

        ``slices``: for a stroke, the slices its voxels lie on (else they are re-read).
        """
        saved.edits.append(edit)
        with self._lock:
            new_slices = slices is None or not slices <= self._annotated
        if slices is not None and edit.kind == "correction":
            with self._lock:
                self._corrected |= slices  # a correction changes nothing else
        elif slices is not None and edit.kind == "annotation" and edit.whole_slices:
            with self._lock:
                self._annotated |= slices
                recheck = slices & self._corrected  # the stroke may cover every correction
            self._update_rows(edit, sorted(recheck), annotated=False)
        else:
            self._update_rows(edit)
        if merged_round is not None and shows_merge:
            region = edit.region
            if new_slices or edit.kind != "annotation":
                region = _whole_slices(edit.region, self.project.shape, self.project.axis)
            saved.merged.append((region, self.project.merged_labels(merged_round, region)))

    def _forget_old_members(self, keep: int = 256) -> None:
        """Drop the boxes of items older than the last ``keep`` (call under the lock)."""
        oldest = self._seq - keep
        for members in self._members.values():
            for k, member in enumerate(members):
                if member.seq < oldest and member.values is not None:
                    members[k] = member._replace(values=None, mask=None)

    def _update_rows(
        self, edit: Edit, slices: Iterable[int] | None = None, *, annotated: bool = True
    ) -> None:
        """Re-read which of the edit's slices (or ``slices``) hold annotated (unless
        ``annotated`` is False) and corrected voxels."""
        axis = self.project.axis
        if slices is None:
            slices = range(edit.region[axis].start, edit.region[axis].stop)
        arrays = [(self._corrected, self.project.corrected)]
        if annotated:
            arrays.append((self._annotated, self.project.annotated))
        for i in slices:
            index = self.project.slice_index(i)
            for rows, array in arrays:
                now = bool(np.asarray(array[index]).any())
                with self._lock:
                    if now:
                        rows.add(i)
                    else:
                        rows.discard(i)

    # ----------------------------------------------------------- whole slices
    def mark_annotated(self, i: int, annotation_data) -> Edit | None:
        """Mark slice ``i`` as annotated: its voxels no human labelled take their values
        in ``annotation_data`` (background on an empty slice); human labels stay.

        Returns None when every voxel of the slice is human-labelled already.
        """
        region = self.slice_region(i)
        self.wait()
        unlabelled = ~self.project.human_mask(region)
        edit = None
        if unlabelled.any():
            edit = self.project.apply_edit(
                "annotation",
                region,
                np.asarray(annotation_data[region]),
                unlabelled,
                source=self.source,
                whole_slices=True,
            )
        with self._lock:
            self._annotated.add(int(i))
        return edit

    def unmark(self, i: int) -> Edit:
        """Forget every human label of slice ``i`` (annotations, corrections, an accept):
        its voxels are "not annotated" again and show the model's labels."""
        region = self.slice_region(i)
        self.wait()
        edit = self.project.apply_edit("unannotation", region, source=self.source)
        with self._lock:
            self._annotated.discard(int(i))
            self._corrected.discard(int(i))
        return edit

    def accept_slice(self, i: int, correction_data, *, round: int) -> Edit:
        """Record all of slice ``i`` of ``correction_data`` as human-verified.

        As :meth:`Project.correct_slices` for one slice, reading only that slice.
        """
        if round < 1:
            raise InvalidInputError("no round to accept yet: train a round first")
        region = self.slice_region(i)
        self.wait()
        edit = self.project.apply_edit(
            "correction",
            region,
            np.asarray(correction_data[region]),
            round=round,
            source=self.source,
        )
        with self._lock:
            self._corrected.add(int(i))
        return edit

    def check_trainable(self) -> None:
        """Raise InvalidInputError with a hint when nothing is annotated yet."""
        if not self.has_human_labels:
            raise InvalidInputError(
                "no annotated slice yet: paint at least one slice, or mark an empty slice "
                "as annotated background, then train"
            )

    def slice_region(self, i: int) -> Region:
        """The region of slice ``i`` along the project axis."""
        n = self.project.n_slices
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < n:
            raise InvalidInputError(f"slice must be an integer in 0..{n - 1}, got {i!r}")
        region = [slice(0, s) for s in self.project.shape]
        region[self.project.axis] = slice(int(i), int(i) + 1)
        return tuple(region)


class OpenedProject(NamedTuple):
    """What :func:`open_project_state` hands the widget: the project and its layers' data."""

    project: object  # napari_ssl_seg.store.Project
    session: AnnotationSession
    created: bool
    imported: list[int]
    annotations: np.ndarray  # (Z, Y, X) the project's annotation labels
    merged: np.ndarray | None  # the latest round's merged labels, if any round


def open_project_state(
    path: str | os.PathLike,
    image,
    *,
    voxel_size: Sequence[float] | None = None,
    source: str = "",
    check_image: bool = True,
    labels=None,
    slices: Iterable[int] | None = None,
    axis: int = 0,
) -> OpenedProject:
    """Everything opening a project in the widget needs, read off the GUI thread.

    Opens or creates the project (:func:`open_or_create`: creating copies the image,
    seconds for a large volume), imports the annotated slices of ``labels`` (a Labels
    layer's data painted before the project existed, see :func:`import_annotations`),
    reads the annotations and the latest round's merged labels, and starts an
    :class:`AnnotationSession` with a background writer.

    Parameters
    ----------
    image : (Z, Y, X) array-like
    labels : (Z, Y, X) integer array, optional
    slices : iterable of int, optional
        The slices of ``labels`` that count as annotated (default: those holding labels).
    axis : {0, 1, 2}
        The slice axis of a new project (:func:`open_or_create`).

    Returns
    -------
    OpenedProject
        ``annotations`` is a (Z, Y, X) array of the project's annotation labels;
        ``merged`` the latest round's merged labels, or None before any round.
    """
    project, created = open_or_create(
        path, image, voxel_size=voxel_size, source=source, check_image=check_image, axis=axis
    )
    imported = [] if labels is None else import_annotations(project, labels, slices=slices)
    annotations = np.asarray(project.annotations[...])
    latest = project.latest_round
    merged = project.merged_labels(latest) if latest else None
    # The session reads which slices are annotated and corrected: seconds on a big volume.
    session = AnnotationSession(project, background=True)
    return OpenedProject(project, session, created, imported, annotations, merged)


def _whole_slices(region: Region, shape: Sequence[int], axis: int) -> Region:
    return tuple(
        r if a == axis else slice(0, n) for a, (r, n) in enumerate(zip(region, shape, strict=True))
    )


class _Member(NamedTuple):
    """One history item's part of a logged edit: what to write again if another item of
    that edit is undone (``values``/``mask`` None once napari cannot undo it any more)."""

    seq: int
    key: frozenset
    round: int
    region: Region
    values: np.ndarray | None
    mask: np.ndarray | None


def _overlaid(values: np.ndarray, region: Region, parts: list[tuple]) -> np.ndarray:
    """``values`` (of ``region``) with the masked voxels of ``(region, values, mask)``
    ``parts`` laid over them where they meet."""
    out = values
    for part_region, part_values, part_mask in parts:
        lo = [max(a.start, b.start) for a, b in zip(region, part_region, strict=True)]
        hi = [min(a.stop, b.stop) for a, b in zip(region, part_region, strict=True)]
        if all(a < b for a, b in zip(lo, hi, strict=True)):
            meet = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            mine, theirs = _inner(meet, region), _inner(meet, part_region)
            out = out.copy() if out is values else out
            out[mine] = np.where(part_mask[theirs], part_values[theirs], out[mine])
    return out


def _stroke_units(queued: list[tuple[tuple, int]], axis: int) -> list[list[tuple[tuple, int]]]:
    """``(job, round)`` entries cut into what is written as one edit, in order.

    An undone item (all its boxes) is a unit of its own. Consecutive strokes of one
    layer and one round are grouped by the slices (along ``axis``) they touch, so one
    edit never spans slices that no stroke of it shares (a whole-slice edit reads and
    logs its slices whole).
    """
    units: list[list[tuple[tuple, int]]] = []
    run: list[tuple[tuple, int]] = []

    def close_run() -> None:
        spans: list[list] = []  # [start, stop, entries] along the axis, merged
        for entry in run:
            region = entry[0][3]
            lo, hi = region[axis].start, region[axis].stop
            hits = [s for s in spans if s[0] < hi and lo < s[1]]
            for s in hits:
                spans.remove(s)
                lo, hi = min(lo, s[0]), max(hi, s[1])
            entries = [e for s in hits for e in s[2]] + [entry]
            spans.append([lo, hi, entries])
        for span in sorted(spans, key=lambda s: min(e[0][0] for e in s[2])):
            units.append(sorted(span[2], key=lambda e: e[0][0]))
        run.clear()

    for entry in queued:
        job, job_round = entry
        stroke = not job[6] and job[3] is not None
        if run and not (stroke and (job[1], job_round) == (run[0][0][1], run[0][1])):
            close_run()
        if stroke:
            run.append(entry)
        elif units and units[-1][0][0][6] and units[-1][0][0][:3] == job[:3]:
            units[-1].append(entry)  # another box of the same undone item
        else:
            units.append([entry])
    if run:
        close_run()
    return units


# ----------------------------------------------------------------------- settings
def default_settings() -> dict[str, Any]:
    """Widget settings of a new project."""
    return {
        "method": TrainConfig().method,
        "preset": "quick",
        "device": "auto",
        "export_format": EXPORT_FORMATS[0],
        "overrides": {},
    }


def load_settings(project_path: str | os.PathLike) -> dict[str, Any]:
    """The widget settings saved in the project (defaults for anything missing or bad)."""
    settings = default_settings()
    path = Path(project_path) / "ssl_seg" / SETTINGS_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return settings
    if not isinstance(saved, dict):
        return settings
    for key, value in saved.items():
        if key in settings and _valid_setting(key, value):
            settings[key] = value
    return settings


def save_settings(project_path: str | os.PathLike, settings: dict[str, Any]) -> Path:
    """Write ``settings`` to ``<project>/ssl_seg/widget.json`` atomically.

    Raises
    ------
    ValueError
        An unknown key, or a value not allowed for its key (named in the message).
    """
    for key, value in settings.items():
        if key not in default_settings():
            raise ValueError(f"unknown setting {key!r}; allowed: {sorted(default_settings())}")
        if not _valid_setting(key, value):
            raise ValueError(f"setting {key!r} cannot be {value!r}")
    path = Path(project_path) / "ssl_seg" / SETTINGS_FILE
    _atomic_write_bytes(path, json.dumps(settings, indent=1, sort_keys=True).encode())
    return path


def _valid_setting(key: str, value: Any) -> bool:
    if key == "method":
        return isinstance(value, str) and bool(value)
    if key == "preset":
        return value in PRESETS
    if key == "device":
        return value in DEVICES
    if key == "export_format":
        return value in EXPORT_FORMATS
    if key == "overrides":
        if not isinstance(value, dict):
            return False
        try:
            TrainConfig.from_dict(value)
        except (InvalidInputError, TypeError):
            return False
        return True
    return False


def build_config(settings: dict[str, Any]) -> TrainConfig:
    """The round's TrainConfig: method, preset iterations and device, then ``overrides``."""
    values = {
        "method": settings["method"],
        "iterations": PRESETS[settings["preset"]],
        "device": settings["device"],
    }
    values.update(settings.get("overrides") or {})
    return TrainConfig.from_dict(values)


# ------------------------------------------------------------------------ export
def export_labels(
    project: Project,
    path: str | os.PathLike,
    *,
    round: int | None = None,
    merged: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the result to ``path`` (tif, NIfTI or OME-Zarr, by extension) with the
    project's voxel size.

    The file is written under a temporary name and renamed, so a failed export leaves
    neither a half file nor a damaged older one.

    Parameters
    ----------
    round : int, optional
        Which round's pseudo-labels (default the latest; 0 or no round: human labels only).
    merged : bool
        True: corrections > annotations > pseudo-labels (label contract above; voxels
        nobody labelled and no round covers are 0). False: the round's model output only.
    overwrite : bool
        Replace an existing file (the widget passes True once its save dialog asked).

    Raises
    ------
    PathExistsError
        ``path`` exists and ``overwrite`` is False.
    InvalidInputError
        ``path`` is the project's source image or inside the project: refused even with
        ``overwrite``.
    """
    from napari_ssl_seg.io import check_output_path, write_labels

    path = Path(path)
    check_export_path(project, path)
    check_output_path(path, overwrite=overwrite)  # before the merge is computed
    r = project.latest_round if round is None else int(round)
    if merged:
        labels = project.merged_labels(r)
    else:
        if r < 1:
            raise InvalidInputError("no round to export yet: train a round first")
        labels = np.asarray(project.pseudo_labels(r)[...])
    return write_labels(path, labels, voxel_size=project.voxel_size, overwrite=overwrite)


def check_export_path(project: Project, path: str | os.PathLike) -> None:
    """Refuse to export over the project's source image or into the project itself.

    Raises
    ------
    InvalidInputError
        ``path`` names the image file the project was made from (as recorded in
        ``project.source``; a relative record is taken from the current folder and from
        the project's folder) or lies inside the project directory.
    """
    target = Path(path).resolve()
    root = project.path.resolve()
    if target == root or root in target.parents:
        raise InvalidInputError(
            f"cannot export to {str(path)!r}: it is inside the project {str(project.path)!r}; "
            "refusing to write there"
        )
    if not project.source:
        return
    recorded = Path(project.source)
    candidates = (
        [recorded]
        if recorded.is_absolute()
        else [Path.cwd() / recorded, project.path.parent / recorded]
    )
    for source in candidates:
        same = source.resolve() == target or (
            source.exists() and target.exists() and os.path.samefile(source, target)
        )
        if same:
            raise InvalidInputError(
                f"cannot export to {str(path)!r}: it is the project's source image "
                f"{str(source)!r}; refusing to write there"
            )


def default_export_path(
    project: Project, fmt: str, *, round: int | None = None, merged: bool = True
) -> Path:
    """A name for an export that matches no existing file: the source image's stem, then
    ``.ssl-labels.r<round>`` (``-model`` for the model's output only) and ``fmt``, beside
    the project, numbered ``-2``, ``-3`` ... when taken.

    Parameters
    ----------
    fmt : {".tif", ".nii.gz", ".ome.zarr"}
    round : int, optional
        The round exported (default the latest).
    """
    if fmt not in EXPORT_FORMATS:
        raise InvalidInputError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    r = project.latest_round if round is None else int(round)
    source = Path(project.source).name if project.source else project.path.name
    lower = source.lower()
    stem = next((source[: -len(s)] for s in _KNOWN_SUFFIXES if lower.endswith(s)), source)
    name = f"{stem or 'volume'}.ssl-labels.r{r}{'' if merged else '-model'}"
    candidate = project.path.parent / f"{name}{fmt}"
    k = 1
    while candidate.exists():
        k += 1
        candidate = project.path.parent / f"{name}-{k}{fmt}"
    return candidate


def format_slices(slices: Iterable[int], *, limit: int = 12) -> str:
    """``[3, 4, 5, 9]`` → ``"3-5, 9"``; at most ``limit`` runs, then ``…``."""
    runs: list[list[int]] = []
    for i in sorted(set(int(s) for s in slices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = [f"{a}-{b}" if b > a else str(a) for a, b in runs[:limit]]
    return ", ".join(text) + (", …" if len(runs) > limit else "")
