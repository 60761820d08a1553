"""The annotation project: one OME-Zarr (NGFF 0.5, Zarr v3) directory per volume.

Layout (``P`` is the project directory)::

    P/zarr.json              attributes.ome: multiscales (NGFF 0.5)
                             attributes.napari_ssl_seg: schema, signature, axis, ...
    P/0                      the image (Z, Y, X), chunked one slice thick
    P/labels/                attributes.ome.labels lists the label images below
        annotations/0        uint16, what humans painted (0 = background where annotated)
        corrections/0        uint16, human corrections of pseudo-labels
        pseudo_rNNN/0        uint16, the model's labels of round NNN (append-only)
        final/0              uint16, corrections > annotations > latest pseudo-labels
    P/ssl_seg/               our extras (not NGFF label images)
        annotated            uint8, 1 where a human annotated the voxel
        corrected            uint16, round whose pseudo-labels the human corrected (0 = none)
        confidence_rNNN      float32, max class probability of round NNN
        edits/NNNNNN.npz     every human edit with provenance (the write-ahead log)
        edits/NNNNNN.done    marker: that edit is applied to the arrays
        rounds/rNNN/         record.json (written last: a round exists iff it exists)
                             checkpoint.pt
        pretrained/          label-free pretraining checkpoints, reused across rounds
                             (NAME.pt and NAME.pt.sha256 beside it)
        writer.lock          the OS lock every writing process holds while it writes
        writer.json          who holds it (pid, command, host, since when)

Crash safety: zarr writes every chunk and metadata file atomically (temp file + rename),
and every human edit is first written whole to ``edits/`` (atomically, fsynced) before
the arrays are touched. A process killed while applying an edit leaves the edit in the
log without its ``.done`` marker; the next writer replays it. The chunk files an edit or
a round wrote are fsynced before its ``.done`` marker or ``record.json`` is written, so
after a power cut nothing is marked done without its data. Rounds are committed by their
``record.json``, written last. The last saved state is therefore always readable and
complete.

One writer at a time: every write (an edit, a round's allocation and commit, refreshing
``final``, the pretrained cache) holds ``ssl_seg/writer.lock`` (see
:meth:`Project.writing`); edit ids and round numbers are allocated under it from what is
on disk. Readers never take it.

Label contract: labels are non-negative integers; on annotated voxels 0 is background and
1..K-1 are classes; which voxels are annotated is recorded in ``ssl_seg/annotated`` so
that "not annotated" is never taken for background.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from filelock import FileLock, Timeout
from zarr.storage import LocalStore

from napari_ssl_seg import __version__
from napari_ssl_seg.errors import (
    InvalidInputError,
    PathExistsError,
    ProjectError,
    ProjectLockedError,
    SignatureMismatchError,
    SslSegError,
)
from napari_ssl_seg.labels import (
    LABEL_DTYPE,
    MAX_CLASSES,
    HumanState,
    apply_human_edit,
    check_image,
    check_labels,
    labelled_slices,
    merge_labels,
)

SCHEMA_VERSION = 1
_ATTR = "napari_ssl_seg"
_EDIT_KINDS = ("annotation", "unannotation", "correction")
# Largest block (in voxels) read or written at once when streaming whole volumes.
_SLAB_VOXELS = 2**24
#: Seconds a writer waits for another process's write to finish before giving up with
#: :class:`ProjectLockedError`; edits take well under a second, so a longer wait means a
#: long write (a whole-volume refresh) or a stuck process. The environment variable
#: ``NAPARI_SSL_SEG_LOCK_TIMEOUT`` overrides it.
LOCK_TIMEOUT = 10.0
#: A trained round waits longer to commit: giving up would throw the training away.
ROUND_LOCK_TIMEOUT = 300.0


def _naming_damage(method):
    """Run a Project method inside :meth:`Project.reading` (damaged chunks named)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.reading():
            return method(self, *args, **kwargs)

    return wrapper


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never half.

    ``durable``: fsync the file and, after the rename, its directory, so that the new file
    survives a power cut (not needed for throwaway files such as the lock holder's note).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp name (never reused: "x" mode), so two writers of one path never write
    # into each other's file; the usual permissions, unlike tempfile's private 0600.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:16]}.partial")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make the renames and deletions in directory ``path`` durable (POSIX only)."""
    if os.name != "posix":  # Windows cannot open a directory; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    # POSIX syncs a file through any descriptor; Windows needs one open for writing.
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DurableLocalStore(LocalStore):
    """zarr's LocalStore that remembers the files it wrote or deleted until :meth:`sync`.

    zarr writes each chunk atomically (temp file + rename) but does not fsync it; an edit's
    ``.done`` marker or a round's record must not reach the disk before the chunks do.
    Syncing once at the end of a write lets the kernel write the chunks back together.
    """

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()  # zarr writes from its own event-loop thread
        # Directories whose own entry (in their parent) this store made durable: a later
        # write below them needs only its own directory synced, not the whole chain.
        self._durable_dirs: set[Path] = set()

    def _touched(self, key: str) -> None:
        with self._dirty_lock:
            self._dirty.add(key)

    async def set(self, key, value) -> None:
        await super().set(key, value)
        self._touched(key)

    async def set_if_not_exists(self, key, value) -> None:
        await super().set_if_not_exists(key, value)
        self._touched(key)

    async def delete(self, key) -> None:
        await super().delete(key)
        self._touched(key)
        self._durable_dirs.clear()  # zarr may have removed emptied directories

    async def delete_dir(self, prefix) -> None:
        await super().delete_dir(prefix)
        self._touched(prefix)
        self._durable_dirs.clear()

    def sync(self) -> None:
        """fsync every file written since the last call, then their directories."""
        with self._dirty_lock:
            keys, self._dirty = self._dirty, set()
        directories, made = set(), set()
        for key in keys:
            path = self.root / key
            if path.is_file():
                _fsync_file(path)
            # A rename, a deletion (zarr deletes chunks that became all fill value) or a
            # new chunk directory is durable once the directories above it are (up to
            # one whose entry is known durable already).
            directories.add(path.parent)
            child = path.parent
            while child != self.root and self.root in child.parents:
                if child in self._durable_dirs:
                    break
                directories.add(child.parent)
                made.add(child)
                child = child.parent
            directories.add(self.root)
        for directory in directories:
            if directory.is_dir():
                _fsync_dir(directory)
        with self._dirty_lock:
            self._durable_dirs |= {d for d in made if d.is_dir()}


def chunk_shape(shape: Sequence[int], axis: int) -> tuple[int, ...]:
    """Chunks one voxel thick along the slice axis, at most 512 wide in the others.

    Slice-wise training and inference read and write whole slices; brush strokes touch
    one slice, so an edit rewrites only a few chunks.
    """
    return tuple(1 if a == axis else min(int(n), 512) for a, n in enumerate(shape))


def iter_slabs(shape: Sequence[int], axis: int = 0) -> Iterator[tuple[slice, ...]]:
    """Slabs along ``axis`` of at most ~16 M voxels, to stream a volume chunk-aligned."""
    plane = int(np.prod([n for a, n in enumerate(shape) if a != axis]))
    step = max(1, _SLAB_VOXELS // max(plane, 1))
    for start in range(0, shape[axis], step):
        index = [slice(None)] * len(shape)
        index[axis] = slice(start, min(start + step, shape[axis]))
        yield tuple(index)


def _native(dtype) -> np.dtype:
    """``dtype`` in this machine's byte order (zarr hands back native arrays)."""
    return np.dtype(dtype).newbyteorder("=")


def image_signature(image, axis: int = 0) -> str:
    """SHA-1 of the image's shape, dtype and voxels, read slab by slab.

    Byte order is normalised, so a big-endian source (some TIFF and FITS files) and the
    native copy stored in the project have the same signature.
    """
    dtype = _native(image.dtype)
    digest = hashlib.sha1()
    digest.update(repr((tuple(int(n) for n in image.shape), str(dtype))).encode())
    for index in iter_slabs(image.shape, axis):
        digest.update(np.ascontiguousarray(image[index], dtype=dtype).tobytes())
    return "sha1:" + digest.hexdigest()


@dataclass(frozen=True)
class Edit:
    """One human edit, as kept in the project's edit log.

    Attributes
    ----------
    id : int
        Position in the log (1-based, increasing).
    kind : {"annotation", "unannotation", "correction", "revert"}
    round : int
        For corrections, the round whose pseudo-labels were corrected; else 0.
    region : tuple of slice
        Bounding box of the edit in (Z, Y, X).
    n_voxels : int
        Voxels the edit touched.
    source : str
        Who made it ("widget", "cli", "api", ...).
    time : str
        ISO time it was logged.
    whole_slices : bool
        True when the edit marked whole slices (along the project axis) as annotated.
    """

    id: int
    kind: str
    round: int
    region: tuple[slice, ...]
    n_voxels: int
    source: str
    time: str
    whole_slices: bool


class Project:
    """An annotation project on disk. Create with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, path: Path, root: zarr.Group) -> None:
        self.path = Path(path)
        self._root = root
        meta = root.attrs[_ATTR]
        if meta.get("axis") not in (0, 1, 2) or isinstance(meta.get("axis"), bool):
            raise ProjectError(f"{path}: the project is damaged: axis is {meta.get('axis')!r}")
        self.axis: int = int(meta["axis"])
        self.signature: str = meta["data_signature"]
        vs = meta.get("voxel_size")
        self.voxel_size: tuple[float, ...] | None = tuple(vs) if vs else None
        self.units: str = meta.get("units", "micrometer")
        self.source: str = meta.get("source", "")
        #: Seconds a write waits for another writer (see :meth:`writing`).
        self.lock_timeout: float = _default_lock_timeout()
        self._store = root.store
        try:
            self.image: zarr.Array = root["0"]
            self.annotations: zarr.Array = root["labels/annotations/0"]
            self.corrections: zarr.Array = root["labels/corrections/0"]
            self.final: zarr.Array = root["labels/final/0"]
            self.annotated: zarr.Array = root["ssl_seg/annotated"]
            self.corrected: zarr.Array = root["ssl_seg/corrected"]
        except KeyError as err:
            raise ProjectError(f"{path}: the project is damaged: missing array {err}") from None
        except Exception as err:  # unreadable array metadata: zarr raises several types
            raise ProjectError(
                f"{path}: the project is damaged: {type(err).__name__}: {err}"
            ) from None
        for name in ("annotations", "corrections", "final", "annotated", "corrected"):
            if getattr(self, name).shape != self.image.shape:
                raise ProjectError(
                    f"{path}: the project is damaged: {name} has shape "
                    f"{getattr(self, name).shape}, the image {self.image.shape}"
                )

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        image,
        *,
        axis: int = 0,
        voxel_size: Sequence[float] | None = None,
        units: str = "micrometer",
        source: str = "",
        labels=None,
        annotated_slices: Sequence[int] | None = None,
        max_classes: int = MAX_CLASSES,
        edit_source: str = "api",
        overwrite: bool = False,
    ) -> Project:
        """Create a project for ``image`` at ``path``, with its first annotations if given.

        Parameters
        ----------
        path : path-like
            Directory to create (conventionally ``*.zarr``).
        image : (Z, Y, X) array-like
            Any numeric array with ``shape``/``dtype``/slicing (numpy, zarr, dask, a
            tifffile or nibabel proxy). It is copied chunk by chunk, never read whole.
        axis : int
            The slice axis along which annotators label and 2D models train.
        voxel_size : sequence of 3 floats, optional
            Physical size of a voxel along (Z, Y, X) in ``units``.
        labels : (Z, Y, X) integer array-like, optional
            Human annotations to start with (label contract: 0 = background on annotated
            voxels, 1..K-1 = classes), recorded as edits by ``edit_source`` before the
            project appears at ``path``.
        annotated_slices : sequence of int, optional
            The slices of ``labels`` (along ``axis``) that count as annotated, empty ones
            included; default those holding any label.
        max_classes : int
            Largest label ``labels`` may hold (see :func:`~napari_ssl_seg.labels.check_labels`).
        overwrite : bool
            Replace the napari-ssl-seg project at ``path``; it is removed only once the new
            project is complete, so a failed or killed create leaves it as it was.
            Anything else at ``path`` is never replaced.

        Raises
        ------
        InvalidInputError
            The image is not a finite numeric 3D volume, ``axis``/``voxel_size`` are
            off, or ``labels``/``annotated_slices`` break the label contract. Every input
            is checked before anything is written.
        PathExistsError
            ``path`` exists and ``overwrite`` is False.
        ProjectError
            ``overwrite`` is True but ``path`` is not a napari-ssl-seg project.
        """
        path = Path(path)
        check_image(image, name=source or "image")
        shape = tuple(int(n) for n in image.shape)
        is_int = isinstance(axis, (int, np.integer)) and not isinstance(axis, bool)
        if not is_int or axis not in (0, 1, 2):
            raise InvalidInputError(f"axis must be 0, 1 or 2, got {axis!r}")
        axis = int(axis)
        voxel_size = _check_voxel_size(voxel_size)
        slices = _initial_slices(labels, annotated_slices, shape, axis, max_classes)
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise PathExistsError(path)
            if not _is_project(path):
                raise ProjectError(
                    f"{path} is not a napari-ssl-seg project; refusing to replace it"
                )
            with _replacing(path):  # fail before the copy if another process writes it
                pass
        # Build beside the target and rename at the end: a crash leaves no half project,
        # and an existing project is replaced only once its successor is complete.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            cls._build(tmp, image, shape, axis, voxel_size, units, source)
            if slices:
                cls.open(tmp, verify=False).annotate_slices(
                    labels, slices, source=edit_source, max_classes=max_classes
                )
            if path.exists():
                # Never from under another writer (a training, the widget): hold its lock.
                with _replacing(path):
                    old = path.with_name(f".{path.name}.{os.getpid()}.old")
                    if old.exists():
                        shutil.rmtree(old)
                    os.replace(path, old)
                    os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(path, verify=False)

    @staticmethod
    def _build(tmp: Path, image, shape, axis, voxel_size, units, source) -> None:
        """Write a complete new project at ``tmp`` (see :meth:`create`)."""
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        chunks = chunk_shape(shape, axis)
        dtype = _native(image.dtype)
        img = root.create_array("0", shape=shape, dtype=dtype, chunks=chunks)
        digest = hashlib.sha1(repr((shape, str(dtype))).encode())
        for index in iter_slabs(shape, axis):
            block = np.ascontiguousarray(image[index], dtype=dtype)
            img[index] = block
            digest.update(block.tobytes())
        labels = root.create_group("labels")
        for name in ("annotations", "corrections", "final"):
            _create_label_image(labels, name, shape, chunks, voxel_size, units)
        extras = root.create_group("ssl_seg")
        for name, dtype in (("annotated", np.uint8), ("corrected", np.uint16)):
            extras.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0)
        labels.attrs["ome"] = {"version": "0.5", "labels": ["annotations", "corrections", "final"]}
        root.attrs["ome"] = _multiscales("image", voxel_size, units)
        root.attrs[_ATTR] = {
            "schema_version": SCHEMA_VERSION,
            "data_signature": "sha1:" + digest.hexdigest(),
            "axis": axis,
            "voxel_size": list(voxel_size) if voxel_size else None,
            "units": units,
            "source": str(source),
            "created": _now(),
            "created_by": f"napari-ssl-seg {__version__}",
        }

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        image=None,
        verify: bool | None = None,
        recover: bool = True,
    ) -> Project:
        """Open the project at ``path``.

        Parameters
        ----------
        image : (Z, Y, X) array-like, optional
            If given, its signature must equal the project's (so labels cannot attach to
            the wrong volume).
        verify : bool, optional
            Re-hash the stored image and compare with the signature. Default: only for
            volumes under 1 GiB.
        recover : bool
            Replay human edits that a crash left unapplied. Readers in other processes
            (a training child) pass False so that only the owner writes.

        Raises
        ------
        ProjectError
            Missing directory, not a project, damaged or from a newer schema.
        SignatureMismatchError
            ``image`` (or the stored image, when verifying) does not match the signature.
        """
        path = Path(path)
        if not path.exists():
            left = sorted(path.parent.glob(f".{path.name}.*.old"))
            hint = f" (an interrupted overwrite left the old one at {left[-1]})" if left else ""
            raise ProjectError(f"{path}: no such project directory{hint}")
        if not (path / "zarr.json").is_file():
            raise ProjectError(f"{path} is not a napari-ssl-seg project (no zarr.json)")
        try:
            root = zarr.open_group(_DurableLocalStore(path), mode="r+", zarr_format=3)
            meta = root.attrs.get(_ATTR)
        except Exception as err:  # zarr raises several types for unreadable metadata
            raise ProjectError(f"{path}: cannot read the project metadata: {err}") from None
        if not isinstance(meta, dict) or "data_signature" not in meta:
            raise ProjectError(f"{path} is a Zarr group but not a napari-ssl-seg project")
        version = meta.get("schema_version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ProjectError(f"{path}: the project is damaged: schema_version is {version!r}")
        if version > SCHEMA_VERSION:
            raise ProjectError(
                f"{path}: project schema {version} is newer than this napari-ssl-seg "
                f"understands ({SCHEMA_VERSION}); upgrade napari-ssl-seg"
            )
        project = cls(path, root)
        if verify is None:
            verify = project.image.nbytes < 2**30
        if verify:
            with project.reading():
                stored = image_signature(project.image, project.axis)
            if stored != project.signature:
                raise ProjectError(
                    f"{path}: the stored image does not match its signature (damaged)"
                )
        if image is not None:
            given = image_signature(image, project.axis)
            if given != project.signature:
                raise SignatureMismatchError(
                    f"{path}: this project belongs to another image "
                    f"(signature {project.signature}, the image given has {given})"
                )
        if recover and project._pending_edits():
            # Pending edits of a live writer are its own to finish; those a crash left are
            # replayed here, or by the next write (which replays before it logs). Without
            # any, nothing is locked or written: a read-only copy opens too.
            with contextlib.suppress(ProjectLockedError), project.writing(timeout=0):
                project._replay_pending_edits()
        return project

    # -------------------------------------------------------------------- locking
    @contextlib.contextmanager
    def writing(self, *, timeout: float | None = None, what: str = "") -> Iterator[None]:
        """Hold the project's writer lock (an OS file lock) for the ``with`` block.

        Every write to a project happens under it, in every process: two processes (the
        widget, its training child, a CLI command) never write at once, and edit ids and
        round numbers are allocated from what is on disk. Re-entrant within a thread;
        other threads of the same process wait like other processes. Readers never take it.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait for another writer (default :attr:`lock_timeout`; 0: try once).
        what : str
            What this process is writing, shown to a writer that has to wait.

        Raises
        ------
        ProjectLockedError
            Another writer held the lock for ``timeout`` seconds; the message names it.
        """
        lock = _writer_lock(self._lock_path)
        wait = self.lock_timeout if timeout is None else max(0.0, float(timeout))
        try:
            lock.acquire(timeout=wait, poll_interval=0.02)
        except Timeout:
            raise ProjectLockedError(self._holder_message()) from None
        outermost = lock.lock_counter == 1
        try:
            if outermost:
                holder = {
                    "pid": os.getpid(),
                    "command": _command_line(),
                    "host": socket.gethostname(),
                    "since": time.time(),
                    "what": what,
                }
                _atomic_write_bytes(self._holder_path, json.dumps(holder).encode(), durable=False)
            yield
        finally:
            if outermost:
                with contextlib.suppress(OSError):
                    self._holder_path.unlink()
            lock.release()

    @property
    def _lock_path(self) -> Path:
        return self.path / "ssl_seg" / "writer.lock"

    @property
    def _holder_path(self) -> Path:
        return self.path / "ssl_seg" / "writer.json"

    def _holder_message(self) -> str:
        """One line naming the process that holds the writer lock, as far as known."""
        try:
            holder = json.loads(self._holder_path.read_text())
            pid, since = int(holder["pid"]), float(holder["since"])
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        else:
            command = holder.get("command") or "?"
            if holder.get("what"):
                command += f": {holder['what']}"
            host = holder.get("host")
            where = f" on {host}" if host and host != socket.gethostname() else ""
            clock = time.strftime("%H:%M:%S", time.localtime(since))
            who = f"pid {pid}{where} ({command}) since {clock}"
        return f"{self.path} is being written by {who}; try again when it finishes"

    # -------------------------------------------------------------- damaged chunks
    @contextlib.contextmanager
    def reading(self, index=...) -> Iterator[None]:
        """Report a damaged chunk met in the ``with`` block as a one-line ProjectError.

        zarr's codecs raise their own errors (a zstd ``RuntimeError`` for a truncated
        chunk) without saying which array; on such an error the project's arrays are
        read at ``index`` (default everywhere) to find the damaged one. An error that no
        damaged array explains is raised unchanged.
        """
        try:
            yield
        except SslSegError:
            raise
        except Exception as err:
            damaged = self._find_damaged(index)
            if damaged is None:
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            damaged = "0 (the image)" if damaged == "0" else damaged
            raise ProjectError(
                f"{self.path}: array {damaged} is damaged (a chunk cannot be read: "
                f"{type(err).__name__}: {reason}); restore the project from a backup"
            ) from None

    def _find_damaged(self, index=...) -> str | None:
        """Path of the first project array that cannot be read at ``index``, or None."""
        arrays = [self.image, self.annotations, self.corrections, self.final]
        arrays += [self.annotated, self.corrected]
        with contextlib.suppress(Exception):
            for r in (record["round"] for record in self.rounds()):
                arrays += [self.pseudo_labels(r), self.confidence(r)]
        blocks = iter_slabs(self.shape, self.axis) if index is Ellipsis else [index]
        for index in blocks:
            for array in arrays:
                try:
                    array[index]
                except Exception:  # noqa: BLE001 - any codec error means damage here
                    return array.path
        return None

    # ----------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)

    @property
    def n_slices(self) -> int:
        return self.shape[self.axis]

    def slice_index(self, i: int) -> tuple[slice | int, ...]:
        """Index that selects slice ``i`` along the project axis."""
        index: list[slice | int] = [slice(None)] * 3
        index[self.axis] = i
        return tuple(index)

    def annotated_slices(self) -> list[int]:
        """Slices (along the project axis) holding at least one annotated voxel."""
        return _nonzero_slices(self.annotated, self.axis)

    def corrected_slices(self) -> list[int]:
        """Slices holding at least one human-corrected voxel."""
        return _nonzero_slices(self.corrected, self.axis)

    def human_mask(self, index=...) -> np.ndarray:
        """Boolean mask of voxels a human annotated or corrected (the sacred ones)."""
        return (np.asarray(self.annotated[index]) > 0) | (np.asarray(self.corrected[index]) > 0)

    def human_labels(self, index=...) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, mask)`` of human-known voxels: corrections win over annotations."""
        ann = np.asarray(self.annotated[index]) > 0
        cor = np.asarray(self.corrected[index]) > 0
        labels = np.where(cor, self.corrections[index], np.where(ann, self.annotations[index], 0))
        return labels.astype(LABEL_DTYPE), ann | cor

    # ---------------------------------------------------------------------- edits
    def apply_edit(
        self,
        kind: str,
        region: Sequence[slice],
        values: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        *,
        round: int = 0,
        source: str = "api",
        whole_slices: bool = False,
    ) -> Edit:
        """Log and apply one human edit.

        Parameters
        ----------
        kind : {"annotation", "unannotation", "correction"}
            "annotation" writes human labels; "unannotation" forgets every human label of
            the voxels, annotations and corrections (they are "not annotated" again);
            "correction" records corrections of round ``round``. The edit rule decides
            (:func:`~napari_ssl_seg.labels.apply_human_edit`): the latest act wins.
        region : tuple of 3 slices
            Bounding box (with explicit start/stop) of the edit in (Z, Y, X).
        values : integer ndarray, shape of ``region``
            New labels (label contract: 0 = background, 1..K-1 = classes). Not used by
            "unannotation".
        mask : bool ndarray, shape of ``region``, optional
            Which voxels of the box the edit touches (default: all).
        round : int
            For "correction": the round whose pseudo-labels are corrected (>= 1).
        whole_slices : bool
            For "annotation": every slice the edit touches becomes fully annotated (the
            rest of the slice is background where no human labelled it) - what painting a
            slice means.

        Returns
        -------
        Edit
            The logged record. The edit is on disk before any array is touched.
        """
        if kind not in _EDIT_KINDS:
            raise InvalidInputError(f"kind must be one of {_EDIT_KINDS}, got {kind!r}")
        region = self._check_region(region)
        box = tuple(s.stop - s.start for s in region)
        if kind == "unannotation":
            values = np.zeros(box, LABEL_DTYPE)
        elif values is None:
            raise InvalidInputError(f"a {kind!r} edit needs values")
        values = np.asarray(values)
        check_labels(values, shape=box, name=f"{kind} values")
        mask = np.ones(box, bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != box:
            raise InvalidInputError(f"mask shape {mask.shape} does not match the region {box}")
        if kind == "correction" and round < 1:
            raise InvalidInputError(
                f"a correction needs the round it corrects (>= 1), got {round}"
            )
        if kind == "correction" and round > self.latest_round:
            raise ProjectError(
                f"{self.path}: cannot correct round {round}: the latest committed round is "
                f"{self.latest_round}"
            )
        record = {
            "kind": kind,
            "round": int(round),
            "source": source,
            "whole_slices": bool(whole_slices),
            "start": [s.start for s in region],
            "stop": [s.stop for s in region],
        }
        return self._log_and_apply(record, values.astype(LABEL_DTYPE), mask)

    def revert_edits(self, edit_ids: Sequence[int], *, source: str = "api") -> Edit:
        """Undo logged edits: their voxels go back to what they were before them.

        What an undo of a stroke means: an undone stroke on a slice nobody annotated
        leaves it unannotated, and the marks the stroke replaced (a correction, say) come
        back. The revert is itself a logged human edit (kind "revert"), so the audit
        trail keeps the stroke and its undoing.

        Parameters
        ----------
        edit_ids : sequence of int
            Ids of logged edits (:meth:`edits`); reverted newest first. Voxels that later
            edits changed again are set back too: revert the latest edits only.

        Raises
        ------
        InvalidInputError
            No id, or an id that is not in the log.
        """
        ids = sorted({int(i) for i in edit_ids})
        logged = {int(p.stem) for p in self._edits_dir.glob("*.npz")}
        missing = [i for i in ids if i not in logged]
        if not ids or missing:
            raise InvalidInputError(
                f"edit ids to revert must be logged edits, got {list(edit_ids)!r} "
                f"(not in the log: {missing})"
            )
        boxes = [self._edit_before(i)[2] for i in ids]
        start = [min(b[a].start for b in boxes) for a in range(3)]
        stop = [max(b[a].stop for b in boxes) for a in range(3)]
        record = {
            "kind": "revert",
            "round": 0,
            "source": source,
            "whole_slices": False,
            "start": start,
            "stop": stop,
            "reverts": ids,
        }
        box = tuple(b - a for a, b in zip(start, stop, strict=True))
        return self._log_and_apply(record, np.zeros(box, LABEL_DTYPE), np.ones(box, bool))

    def _log_and_apply(self, record: dict, values: np.ndarray, mask: np.ndarray) -> Edit:
        """Log the edit (with the block's state before it) first, then apply it.

        Under the writer lock: the id comes from the log on disk, and the block read as
        "before" cannot change until the edit is applied.
        """
        with self.writing(what=f"recording a {record['kind']}"), self.reading():
            # Edits a crashed writer left unapplied come first: the log is in the order made.
            self._replay_pending_edits()
            edit_id = self._next_edit_id()
            record = {"id": edit_id, "time": _now(), **record}
            index = self._apply_region(record, mask)
            before = self._read_human(index)
            after = self._outcome(record, before, values, mask)
            buf = _npz_bytes(record, values, mask, before, before.changed(after))
            _atomic_write_bytes(self._edit_path(edit_id, ".npz"), buf)
            self._write_human(index, after, before)
            self._mark_done(edit_id)
        return _edit_from_record(record, int(mask.sum()))

    def annotate_slices(
        self,
        labels,
        slices: Sequence[int],
        *,
        source: str = "api",
        max_classes: int = MAX_CLASSES,
    ) -> list[Edit]:
        """Mark ``slices`` as fully annotated with the labels of a whole volume.

        Parameters
        ----------
        labels : (Z, Y, X) integer array-like
            Label contract: 0 = background, 1..K-1 = classes. Only ``slices`` are read;
            a slice may hold only background (an annotated empty slice).
        slices : sequence of int
            Indices along the project axis.
        max_classes : int
            Largest label ``labels`` may hold (an instance or intensity image is refused).
        """
        check_labels(labels, shape=self.shape, name="labels", max_classes=max_classes)
        regions = self._slice_regions(slices)
        edits = []
        for region in regions:
            edits.append(
                self.apply_edit(
                    "annotation",
                    region,
                    np.asarray(labels[region]),
                    source=source,
                    whole_slices=True,
                )
            )
        return edits

    def correct_slices(
        self,
        labels,
        slices: Sequence[int],
        *,
        round: int | None = None,
        source: str = "api",
        max_classes: int = MAX_CLASSES,
    ) -> list[Edit]:
        """Record ``slices`` of ``labels`` as human corrections of round ``round``.

        Every voxel of those slices becomes human-verified, as when an annotator accepts
        a corrected slice. ``round`` defaults to the latest round.
        """
        round = self.latest_round if round is None else int(round)
        if round < 1:
            raise ProjectError(f"{self.path}: no round to correct yet; train a round first")
        check_labels(labels, shape=self.shape, name="labels", max_classes=max_classes)
        return [
            self.apply_edit(
                "correction", region, np.asarray(labels[region]), round=round, source=source
            )
            for region in self._slice_regions(slices)
        ]

    def edits(self) -> list[Edit]:
        """Every logged human edit, oldest first (the audit trail)."""
        out = []
        for p in sorted(self._edits_dir.glob("*.npz")):
            with np.load(p) as z:
                record = json.loads(str(z["record"]))
                out.append(_edit_from_record(record, int(z["mask"].sum())))
        return out

    @property
    def revision(self) -> int:
        """Id of the last applied edit: the human labels a model was trained on."""
        done = sorted(self._edits_dir.glob("*.done"))
        return int(done[-1].stem) if done else 0

    # --------------------------------------------------------------------- rounds
    @property
    def latest_round(self) -> int:
        """Number of the newest committed round (0 when none)."""
        rounds = self.rounds()
        return rounds[-1]["round"] if rounds else 0

    def rounds(self) -> list[dict]:
        """Records of every committed round, oldest first."""
        out = []
        for p in sorted(
            self._rounds_dir.glob("r*/record.json"), key=lambda q: int(q.parent.name[1:])
        ):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError) as err:
                raise ProjectError(f"{p}: unreadable round record: {err}") from None
        return out

    def round_record(self, r: int) -> dict:
        path = self._rounds_dir / f"r{r:03d}" / "record.json"
        if not path.is_file():
            raise ProjectError(
                f"{self.path}: no round {r} (rounds: {[x['round'] for x in self.rounds()]})"
            )
        return json.loads(path.read_text())

    def pseudo_labels(self, r: int | None = None) -> zarr.Array:
        """The model's labels of round ``r`` (default latest), uint16 (Z, Y, X)."""
        r = self._resolve_round(r)
        return self._root[f"labels/pseudo_r{r:03d}/0"]

    def confidence(self, r: int | None = None) -> zarr.Array:
        """The model's confidence (max class probability) of round ``r``, float32."""
        r = self._resolve_round(r)
        return self._root[f"ssl_seg/confidence_r{r:03d}"]

    def checkpoint_path(self, r: int | None = None) -> Path:
        r = self._resolve_round(r)
        return self._rounds_dir / f"r{r:03d}" / "checkpoint.pt"

    def begin_round(self) -> RoundWriter:
        """Reserve the next round number and start writing its outputs.

        The number is allocated under the writer lock and reserved on disk, so two
        trainings never take the same one; the lock is not held while the round's own
        arrays are written (nobody else writes them), so humans keep editing meanwhile.
        The round exists once :meth:`RoundWriter.commit` returns.
        """
        with self.writing(timeout=max(self.lock_timeout, ROUND_LOCK_TIMEOUT), what="a round"):
            return RoundWriter(self, self._reserve_round())

    def pretrained_path(self, name: str) -> Path:
        """Where label-free pretraining weights named ``name`` are kept."""
        return self.path / "ssl_seg" / "pretrained" / f"{name}.pt"

    def save_pretrained(self, name: str, payload: bytes) -> Path:
        """Keep pretraining weights ``payload`` as ``name``, with their sha256 beside them."""
        path = self.pretrained_path(name)
        digest_path = path.with_name(path.name + ".sha256")
        digest = hashlib.sha256(payload).hexdigest()
        with self.writing(what="saving pretraining weights"):
            # Two files cannot be replaced at once: while the weights are replaced, the
            # digest file vouches for the new and the old, so a process killed between
            # the writes leaves weights that verify (the old or the new), never neither.
            try:
                old = digest_path.read_text().split()
            except OSError:
                old = []
            _atomic_write_bytes(digest_path, "\n".join([digest, *old]).encode())
            _atomic_write_bytes(path, payload)
            _atomic_write_bytes(digest_path, digest.encode())
        return path

    def load_pretrained(self, name: str) -> bytes | None:
        """The pretraining weights kept as ``name``, or None when there are none.

        Raises
        ------
        ProjectError
            The file does not match the sha256 recorded beside it (or none is recorded).
        """
        path = self.pretrained_path(name)
        if not path.is_file():
            return None
        payload = path.read_bytes()
        try:
            # One digest, or while a save was under way the new and the old ones.
            expected = path.with_name(path.name + ".sha256").read_text().split()
        except OSError:
            raise ProjectError(f"{path}: no sha256 recorded beside it; not trusted") from None
        if hashlib.sha256(payload).hexdigest() not in expected:
            raise ProjectError(f"{path} does not match its recorded sha256 (damaged or altered)")
        return payload

    def checkpoint_bytes(self, r: int | None = None) -> bytes:
        """The checkpoint file of round ``r`` (default latest), checked against its record.

        Raises
        ------
        ProjectError
            The file is missing or its sha256 differs from ``checkpoint_sha256`` in the
            round's record (damaged, truncated or replaced).
        """
        r = self._resolve_round(r)
        path = self.checkpoint_path(r)
        try:
            payload = path.read_bytes()
        except OSError as err:
            raise ProjectError(f"{path}: cannot read the checkpoint: {err.strerror}") from None
        expected = self.round_record(r).get("checkpoint_sha256")
        if expected and hashlib.sha256(payload).hexdigest() != expected:
            raise ProjectError(
                f"{path} does not match the sha256 recorded for round {r} "
                "(damaged, truncated or replaced); refusing to load it"
            )
        return payload

    # ------------------------------------------------------------------ merged view
    @_naming_damage
    def merged_labels(self, r: int | None = None, index=...) -> np.ndarray:
        """Corrections > annotations > pseudo-labels of round ``r`` (default latest).

        Returns a uint16 ndarray of ``index`` (default the whole volume). Where nothing is
        known (no human label, no round) the value is 0.
        """
        r = self.latest_round if r is None else int(r)
        pseudo = self.pseudo_labels(r)[index] if r >= 1 else None
        return merge_labels(
            pseudo,
            self.annotations[index],
            self.annotated[index],
            self.corrections[index],
            self.corrected[index],
        )

    def refresh_final(self, region: Sequence[slice] | None = None) -> None:
        """Rewrite ``labels/final`` (the export source) from the merge, slab by slab.

        Each slab is merged and written under the writer lock (a merge read while another
        process edits would write stale labels over the new ones); the lock is let go
        between slabs, so a long refresh never keeps an annotator waiting long.
        """
        regions = (
            [self._check_region(region)]
            if region is not None
            else iter_slabs(self.shape, self.axis)
        )
        for index in regions:
            with self.writing(what="refreshing the merged labels"), self.reading(index):
                self.final[index] = self.merged_labels(index=index)
                self._store.sync()

    # ------------------------------------------------------------------- internals
    @property
    def _edits_dir(self) -> Path:
        return self.path / "ssl_seg" / "edits"

    @property
    def _rounds_dir(self) -> Path:
        return self.path / "ssl_seg" / "rounds"

    def _edit_path(self, edit_id: int, suffix: str) -> Path:
        return self._edits_dir / f"{edit_id:06d}{suffix}"

    def _next_edit_id(self) -> int:
        """One more than the last id in the log on disk (call under :meth:`writing`)."""
        logged = [int(p.stem) for p in self._edits_dir.glob("*.npz") if p.stem.isdigit()]
        return max(logged, default=0) + 1

    def _mark_done(self, edit_id: int) -> None:
        """Mark an applied edit done, once the chunks it wrote are on disk."""
        self._store.sync()
        _atomic_write_bytes(self._edit_path(edit_id, ".done"), b"")

    def _reserve_round(self) -> int:
        """Allocate the next round number (call under :meth:`writing`).

        A round directory without ``record.json`` is a reservation; its reserving
        process holds ``reserved.lock`` inside it. One whose lock can be taken was left
        by a crash: its directory and arrays are removed and its number can be reused.
        """
        self._rounds_dir.mkdir(parents=True, exist_ok=True)
        taken = []
        for directory in self._rounds_dir.glob("r*"):
            if not directory.name[1:].isdigit():
                continue
            r = int(directory.name[1:])
            if (directory / "record.json").exists() or _reservation_alive(directory):
                taken.append(r)
            else:
                self._discard_round(r)
        r = max(taken, default=0) + 1
        (self._rounds_dir / f"r{r:03d}").mkdir()
        return r

    def _discard_round(self, r: int) -> None:
        """Remove what an uncommitted round ``r`` left (arrays, directory)."""
        labels, extras = self._root["labels"], self._root["ssl_seg"]
        if f"pseudo_r{r:03d}" in labels:
            del labels[f"pseudo_r{r:03d}"]
        if f"confidence_r{r:03d}" in extras:
            del extras[f"confidence_r{r:03d}"]
        shutil.rmtree(self._rounds_dir / f"r{r:03d}", ignore_errors=True)

    def _resolve_round(self, r: int | None) -> int:
        r = self.latest_round if r is None else int(r)
        if r < 1:
            raise ProjectError(f"{self.path}: no round yet; train one first")
        return r

    def _slice_region(self, i: int) -> tuple[slice, ...]:
        if not 0 <= i < self.n_slices:
            raise ProjectError(
                f"slice {i} is outside 0..{self.n_slices - 1} along axis {self.axis}"
            )
        region = [slice(0, n) for n in self.shape]
        region[self.axis] = slice(i, i + 1)
        return tuple(region)

    def _slice_regions(self, slices: Sequence[int]) -> list[tuple[slice, ...]]:
        """Regions of ``slices``, all checked before the caller writes any of them."""
        slices = list(slices)
        bad = [i for i in slices if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
        if bad:
            raise InvalidInputError(f"slices must be integers, got {bad}")
        outside = [int(i) for i in slices if not 0 <= i < self.n_slices]
        if outside:
            raise InvalidInputError(
                f"slices {outside} are outside 0..{self.n_slices - 1} along axis {self.axis}"
            )
        return [self._slice_region(int(i)) for i in slices]

    def _check_region(self, region: Sequence[slice]) -> tuple[slice, ...]:
        region = tuple(region)
        if len(region) != 3 or not all(isinstance(s, slice) for s in region):
            raise InvalidInputError(f"region must be 3 slices (Z, Y, X), got {region!r}")
        out = []
        for s, n in zip(region, self.shape, strict=True):
            # Explicit bounds only: slice.indices() would clip an out-of-bounds box and
            # read negative starts from the end, silently editing other voxels.
            start = 0 if s.start is None else s.start
            stop = n if s.stop is None else s.stop
            if (
                s.step not in (None, 1)
                or not all(isinstance(v, (int, np.integer)) for v in (start, stop))
                or not 0 <= start < stop <= n
            ):
                raise InvalidInputError(
                    f"region {region} is empty, strided or outside the image shape {self.shape}"
                )
            out.append(slice(int(start), int(stop)))
        return tuple(out)

    def _apply_region(self, record: dict, mask=None) -> tuple[slice, ...]:
        """The block an edit changes: its box, or whole slices for a whole-slice stroke."""
        region = tuple(slice(a, b) for a, b in zip(record["start"], record["stop"], strict=True))
        if record["kind"] != "annotation" or not record.get("whole_slices"):
            return region
        return tuple(
            r if a == self.axis else slice(0, n)
            for a, (r, n) in enumerate(zip(region, self.shape, strict=True))
        )

    def _read_human(self, index) -> HumanState:
        return HumanState(
            *(
                np.asarray(array[index])
                for array in (self.annotations, self.annotated, self.corrections, self.corrected)
            )
        )

    def _write_human(
        self, index, state: HumanState, before: HumanState, *, edit_before=None
    ) -> None:
        """Write the chunks of block ``index`` where ``state`` differs from ``before`` (what
        the arrays hold), and ``final`` where it differs from ``edit_before`` (default
        ``before``; a replay finds part of its edit written, ``final`` maybe not), merged
        from ``state`` (the arrays are not read again)."""
        arrays = (self.annotations, self.annotated, self.corrections, self.corrected)
        for array, new, old in zip(arrays, state, before, strict=True):
            box = _chunk_box(new != old, index, array.chunks)
            if box is not None:
                array[box[0]] = new[box[1]]
        touched = state.changed(before if edit_before is None else edit_before)
        box = _chunk_box(touched, index, self.final.chunks)
        if box is None:
            return
        where, local = box
        r = self.latest_round
        pseudo = self.pseudo_labels(r)[where] if r >= 1 else None
        self.final[where] = merge_labels(pseudo, *(array[local] for array in state))

    def _outcome(self, record: dict, before: HumanState, values, mask) -> HumanState:
        """The human state of :meth:`_apply_region` once the edit is applied: the edit rule
        (:func:`~napari_ssl_seg.labels.apply_human_edit`), or for a revert the states
        before the reverted edits, newest first, on the voxels each of them changed."""
        index = self._apply_region(record, mask)
        if record["kind"] == "revert":
            after = before.copy()
            for edit_id in reversed(record["reverts"]):
                old, changed, old_index = self._edit_before(edit_id)
                inner = _inner(old_index, index)
                for now, then in zip(after, old, strict=True):
                    now[inner][changed] = then[changed]
            return after
        box = tuple(slice(a, b) for a, b in zip(record["start"], record["stop"], strict=True))
        if index != box:  # a whole-slice stroke: its box inside the whole slices
            full_values = np.zeros(before.annotated.shape, LABEL_DTYPE)
            full_mask = np.zeros(before.annotated.shape, bool)
            full_values[_inner(box, index)] = values
            full_mask[_inner(box, index)] = mask
            values, mask = full_values, full_mask
        whole = record["kind"] == "annotation" and record.get("whole_slices")
        return apply_human_edit(
            before,
            record["kind"],
            values,
            mask,
            round=int(record["round"]),
            whole_slices_axis=self.axis if whole else None,
        )

    def _edit_before(self, edit_id: int) -> tuple[HumanState, np.ndarray, tuple[slice, ...]]:
        """``(state before, changed mask, block)`` of logged edit ``edit_id``."""
        path = self._edit_path(int(edit_id), ".npz")
        try:
            with np.load(path) as z:
                record = json.loads(str(z["record"]))
                before = HumanState(*(z[f"before_{n}"] for n in HumanState._fields))
                changed = z["changed"]
        except (OSError, KeyError, ValueError) as err:
            raise ProjectError(f"{path}: cannot revert edit {edit_id}: {err}") from None
        return before, changed, self._apply_region(record, None)

    def _pending_edits(self) -> list[Path]:
        """Logged edits without a ``.done`` marker, oldest first."""
        try:
            names = set(os.listdir(self._edits_dir))
        except FileNotFoundError:
            return []
        pending = sorted(n for n in names if n.endswith(".npz") and n[:-4] + ".done" not in names)
        return [self._edits_dir / n for n in pending]

    def _replay_pending_edits(self) -> None:
        """Apply the logged edits that have no ``.done`` marker (call under :meth:`writing`)."""
        for p in self._pending_edits():
            try:
                with np.load(p) as z:
                    record = json.loads(str(z["record"]))
                    values, mask = z["values"], z["mask"]
                    before = HumanState(*(z[f"before_{n}"] for n in HumanState._fields))
            except Exception:
                # Never completed its atomic write: the arrays were never touched.
                p.unlink(missing_ok=True)
                continue
            index = self._apply_region(record, mask)
            self._write_human(
                index,
                self._outcome(record, before, values, mask),
                self._read_human(index),
                edit_before=before,
            )
            self._mark_done(int(p.stem))


class RoundWriter:
    """Writes one round's pseudo-labels and confidence; :meth:`commit` makes it exist.

    Made by :meth:`Project.begin_round`, which reserved the round number. Until
    committed, the round is invisible: a crash leaves arrays that a later
    :meth:`Project.begin_round` removes (see :meth:`Project._reserve_round`).
    """

    def __init__(self, project: Project, round: int) -> None:
        self.project = project
        self.round = round
        self.directory = project._rounds_dir / f"r{round:03d}"
        # Held while this writer lives: the OS drops it when the process dies, which is
        # how a later allocation tells a crashed reservation from a live one.
        self._reservation = FileLock(self.directory / "reserved.lock", thread_local=False)
        self._reservation.acquire(timeout=0)
        root = project._root
        shape, chunks = project.shape, tuple(project.image.chunks)
        labels = root["labels"]
        name = f"pseudo_r{round:03d}"
        if name in labels:
            del labels[name]
        self.pseudo = _create_label_image(
            labels, name, shape, chunks, project.voxel_size, project.units
        )
        extras = root["ssl_seg"]
        if f"confidence_r{round:03d}" in extras:
            del extras[f"confidence_r{round:03d}"]
        self.confidence = extras.create_array(
            f"confidence_r{round:03d}",
            shape=shape,
            dtype=np.float32,
            chunks=chunks,
            fill_value=0.0,
        )

    def write(self, index, labels: np.ndarray, confidence: np.ndarray) -> None:
        """Write a block of pseudo-labels (uint16) and confidence (float32) at ``index``."""
        self.pseudo[index] = labels.astype(LABEL_DTYPE, copy=False)
        self.confidence[index] = confidence.astype(np.float32, copy=False)

    def commit(self, record: dict, checkpoint: bytes) -> dict:
        """Save the checkpoint and the round's record; returns the record as saved.

        Under the writer lock; the round's chunks are fsynced before its record is
        written, so a committed round never lacks its data after a power cut.
        """
        project = self.project
        project._store.sync()  # the round's own chunks: nobody waits for this part
        wait = max(project.lock_timeout, ROUND_LOCK_TIMEOUT)
        with project.writing(timeout=wait, what=f"committing round {self.round}"):
            record = self._commit(record, checkpoint)
        self._release()
        return record

    def abort(self) -> None:
        """Give the round up: remove its arrays and free its number."""
        with self.project.writing(what=f"discarding round {self.round}"):
            self.project._discard_round(self.round)
        self._release()

    def _release(self) -> None:
        self._reservation.release()
        with contextlib.suppress(OSError):
            os.unlink(self._reservation.lock_file)

    def _commit(self, record: dict, checkpoint: bytes) -> dict:
        self.project._store.sync()
        _atomic_write_bytes(self.directory / "checkpoint.pt", checkpoint)
        record = dict(record)
        record.update(
            round=self.round,
            checkpoint="checkpoint.pt",
            checkpoint_sha256=hashlib.sha256(checkpoint).hexdigest(),
            pseudo_labels=f"labels/pseudo_r{self.round:03d}",
            confidence=f"ssl_seg/confidence_r{self.round:03d}",
        )
        # The record commits the round; listing it for NGFF readers comes after, so a
        # crash in between leaves a real round that is merely unlisted.
        _atomic_write_bytes(self.directory / "record.json", json.dumps(record, indent=1).encode())
        labels = self.project._root["labels"]
        ome = dict(labels.attrs["ome"])
        name = f"pseudo_r{self.round:03d}"
        if name not in ome["labels"]:
            ome["labels"] = list(ome["labels"]) + [name]
            labels.attrs["ome"] = ome
            self.project._store.sync()
        return record


# ---------------------------------------------------------------------- helpers
_WRITER_LOCKS: dict[str, FileLock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()


def _writer_lock(path: Path) -> FileLock:
    """The process's one lock object for ``path``: re-entrant per thread, and two
    Project objects of one directory share it instead of deadlocking each other."""
    key = os.path.realpath(path)
    with _WRITER_LOCKS_GUARD:
        if key not in _WRITER_LOCKS:
            _WRITER_LOCKS[key] = FileLock(key, thread_local=True)
        return _WRITER_LOCKS[key]


def _reservation_alive(directory: Path) -> bool:
    """Whether the process that reserved round ``directory`` still holds it."""
    if not (directory / "reserved.lock").exists():
        return False
    probe = FileLock(directory / "reserved.lock", thread_local=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False


def _default_lock_timeout() -> float:
    text = os.environ.get("NAPARI_SSL_SEG_LOCK_TIMEOUT")
    if not text:
        return LOCK_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise InvalidInputError(
            f"NAPARI_SSL_SEG_LOCK_TIMEOUT must be a number of seconds >= 0, got {text!r}"
        )
    return value


def _command_line() -> str:
    """This process's command line, short: ``napari-ssl-seg train P``."""
    argv = list(sys.argv) or ["python"]
    argv[0] = os.path.basename(argv[0]) or "python"
    line = " ".join(argv)
    return line if len(line) <= 80 else line[:77] + "..."


def _multiscales(name: str, voxel_size, units: str) -> dict:
    scale = list(voxel_size) if voxel_size else [1.0, 1.0, 1.0]
    axes = [{"name": a, "type": "space", "unit": units} for a in "zyx"]
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": axes,
                "datasets": [
                    {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}
                ],
            }
        ],
    }


def _create_label_image(parent, name, shape, chunks, voxel_size, units) -> zarr.Array:
    group = parent.create_group(name, overwrite=True)
    ome = _multiscales(name, voxel_size, units)
    ome["image-label"] = {"version": "0.5", "source": {"image": "../../"}}
    group.attrs["ome"] = ome
    return group.create_array("0", shape=shape, dtype=LABEL_DTYPE, chunks=chunks, fill_value=0)


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[None]:
    """Hold the writer lock of the project at ``path`` (one that cannot be opened, being
    damaged, has no writer to wait for)."""
    try:
        project = Project.open(path, verify=False, recover=False)
    except ProjectError:
        yield
        return
    with project.writing(timeout=0, what="being replaced"):
        yield


def _inner(box: Sequence[slice], outer: Sequence[slice]) -> tuple[slice, ...]:
    """``box`` (absolute) as an index into the block ``outer`` that contains it."""
    return tuple(
        slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer, strict=True)
    )


def _nonzero_slices(array: zarr.Array, axis: int) -> list[int]:
    found: list[int] = []
    for index in iter_slabs(array.shape, axis):
        block = np.asarray(array[index])
        other = tuple(a for a in range(3) if a != axis)
        found.extend(int(i) + index[axis].start for i in np.flatnonzero(block.any(axis=other)))
    return found


def _npz_bytes(
    record: dict, values: np.ndarray, mask: np.ndarray, before: HumanState, changed: np.ndarray
) -> bytes:
    """The edit as an ``.npz`` (what ``np.savez_compressed`` writes, at deflate level 1:
    a whole-slice edit logs whole slices, and level 6 costs several times as long)."""
    import io
    import zipfile

    arrays = {
        "record": np.array(json.dumps(record)),
        "values": values,
        "mask": mask,
        "changed": changed,
        **{
            f"before_{name}": array for name, array in zip(HumanState._fields, before, strict=True)
        },
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)
    return buf.getvalue()


def _chunk_box(
    diff: np.ndarray, index: Sequence[slice], chunks: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """The whole chunks of block ``index`` holding a True of ``diff`` (its shape): their
    box in the array and within the block, or None where nothing differs."""
    if not diff.any():
        return None
    where, local = [], []
    for axis, (block, size) in enumerate(zip(index, chunks, strict=True)):
        other = tuple(a for a in range(diff.ndim) if a != axis)
        hit = np.flatnonzero(diff.any(axis=other))
        lo = max(block.start, (block.start + int(hit[0])) // size * size)
        hi = min(block.stop, -(-(block.start + int(hit[-1]) + 1) // size) * size)
        where.append(slice(lo, hi))
        local.append(slice(lo - block.start, hi - block.start))
    return tuple(where), tuple(local)


def _edit_from_record(record: dict, n_voxels: int) -> Edit:
    return Edit(
        id=int(record["id"]),
        kind=record["kind"],
        round=int(record["round"]),
        region=tuple(slice(a, b) for a, b in zip(record["start"], record["stop"], strict=True)),
        n_voxels=n_voxels,
        source=record["source"],
        time=record["time"],
        whole_slices=bool(record.get("whole_slices")),
    )


def _is_project(path: Path) -> bool:
    """True for a directory whose root metadata marks a napari-ssl-seg project."""
    try:
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and _ATTR in (meta.get("attributes") or {})


def _initial_slices(labels, slices, shape, axis, max_classes) -> list[int]:
    """The slices :meth:`Project.create` annotates, every input checked first."""
    if labels is None:
        if slices is not None:
            raise InvalidInputError("annotated_slices needs labels (the labels of those slices)")
        return []
    check_labels(labels, shape=shape, name="labels", max_classes=max_classes)
    if slices is None:
        return labelled_slices(np.asarray(labels), axis)
    slices = list(slices)
    bad = [i for i in slices if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad:
        raise InvalidInputError(f"annotated_slices must be integers, got {bad}")
    outside = [int(i) for i in slices if not 0 <= i < shape[axis]]
    if outside:
        raise InvalidInputError(
            f"annotated_slices {outside} are outside 0..{shape[axis] - 1} along axis {axis}"
        )
    return sorted({int(i) for i in slices})


def _check_voxel_size(voxel_size) -> tuple[float, float, float] | None:
    if voxel_size is None:
        return None
    try:
        out = tuple(float(v) for v in voxel_size)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"voxel_size must be 3 positive numbers (Z, Y, X), got {voxel_size!r}"
        ) from None
    if len(out) != 3 or not all(np.isfinite(out)) or min(out) <= 0:
        raise InvalidInputError(
            f"voxel_size must be 3 positive numbers (Z, Y, X), got {voxel_size!r}"
        )
    return out
