"""Read 3D volumes and write label volumes: TIFF, NIfTI and (OME-)Zarr.

Headless: this module never imports napari or Qt.

Axis order is always ``(z, y, x)`` and voxel sizes are given in the same order. NIfTI
stores arrays as ``(x, y, z)``; :func:`open_volume` hands them back reversed, so the
NIfTI ``affine`` kept on :class:`Volume` still maps *file* voxel indices ``(i, j, k) =
(x, y, z)`` to world coordinates, exactly as nibabel gives it.

Supported paths
---------------
``.tif``/``.tiff``
    tifffile; voxel size from ImageJ metadata (``spacing`` and the X/Y resolution), from
    tifffile's JSON metadata (``voxel_size``) or from OME-XML ``PhysicalSize*``. Plain
    TIFF resolution tags are ignored: most writers put a 72 dpi default there.
``.nii``/``.nii.gz``
    nibabel; voxel size from the header zooms, the affine kept as is.
``.zarr`` (or any directory holding Zarr metadata)
    a plain Zarr array, or an OME-Zarr image group (NGFF 0.4 or 0.5): level 0 of the
    first multiscale, its ``scale`` as the voxel size.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_ssl_seg import _formats, _ome_zarr
from napari_ssl_seg.errors import InvalidInputError, PathExistsError, UnsupportedFileError

__all__ = [
    "Volume",
    "check_output_path",
    "detect_format",
    "open_volume",
    "read_volume",
    "write_labels",
]

#: Suffixes :func:`open_volume` and :func:`write_labels` understand, by format.
SUFFIXES = {
    "tiff": (".tif", ".tiff"),
    "nifti": (".nii", ".nii.gz"),
    "zarr": (".zarr",),
}
_ZARR_METADATA = ("zarr.json", ".zarray", ".zgroup")
_OPENERS = {"tiff": _formats.open_tiff, "nifti": _formats.open_nifti, "zarr": _ome_zarr.open_zarr}


@dataclass
class Volume:
    """A 3D volume and what its file says about its geometry.

    Attributes
    ----------
    data : (Z, Y, X) array-like
        Has ``shape``, ``dtype``, ``ndim`` and ``__getitem__``. From :func:`open_volume`
        it is lazy (a memory map, a Zarr array or a NIfTI proxy); from
        :func:`read_volume` it is a numpy array.
    voxel_size : tuple of 3 floats or None
        ``(z, y, x)`` in the file's unit (micrometre for files this package writes);
        ``None`` when the file does not say.
    affine : (4, 4) ndarray or None
        The NIfTI affine, mapping file voxel indices ``(x, y, z)`` to world (mm or as
        the header says). ``None`` for other formats.
    path : Path
        The file or directory read.
    axes : str
        Always ``"zyx"``.
    """

    data: Any
    voxel_size: tuple[float, float, float] | None
    affine: np.ndarray | None
    path: Path
    axes: str = "zyx"
    _close: Any = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    def close(self) -> None:
        """Release the file handle a lazy TIFF keeps open (no-op otherwise)."""
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def detect_format(path: str | os.PathLike) -> str | None:
    """Return ``"tiff"``, ``"nifti"`` or ``"zarr"`` from the name of ``path``, else None.

    A directory without a ``.zarr`` suffix counts as Zarr when it holds Zarr metadata.
    Nothing is opened, so this is cheap enough for a napari ``get_reader``.
    """
    path = Path(path)
    name = path.name.lower()
    for kind, suffixes in SUFFIXES.items():
        if name.endswith(suffixes):
            return kind
    if path.is_dir() and any((path / m).is_file() for m in _ZARR_METADATA):
        return "zarr"
    return None


def open_volume(path: str | os.PathLike) -> Volume:
    """Open a 3D volume lazily.

    Parameters
    ----------
    path : str or PathLike
        A ``.tif``/``.tiff``, ``.nii``/``.nii.gz`` file or a ``.zarr`` directory.

    Returns
    -------
    Volume
        ``data`` is lazy: an uncompressed TIFF is memory-mapped, a compressed one is
        read through tifffile's Zarr store (call :meth:`Volume.close`, or use the volume
        as a context manager, to release its file handle); NIfTI data stays a nibabel
        proxy seen as ``(z, y, x)``; Zarr arrays are returned as they are.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    UnsupportedFileError
        Unknown extension, empty, unreadable or corrupt file.
    InvalidInputError
        The data is not a 3D numeric volume (the message gives its shape).
    """
    return _open(Path(path), lazy=True)


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D volume into memory; as :func:`open_volume` but ``data`` is an ndarray."""
    return _open(Path(path), lazy=False)


def write_labels(
    path: str | os.PathLike,
    labels: Any,
    *,
    voxel_size: tuple[float, float, float] | None = None,
    affine: np.ndarray | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a label volume; the format follows the extension of ``path``.

    Label contract: on annotated slices 0 is background and 1..K are classes (or
    instances); voxels nobody annotated are tracked separately and are never background.
    A label file stores values only, so keep the annotated-slice record elsewhere.

    Parameters
    ----------
    path : str or PathLike
        ``.tif``/``.tiff`` (ImageJ hyperstack, zlib-compressed; voxel size as ImageJ
        ``spacing`` and resolution in micron), ``.nii``/``.nii.gz`` (NIfTI-1, array stored
        ``(x, y, z)``) or ``.zarr``/``.ome.zarr`` (OME-Zarr 0.5 image group, Zarr v3,
        whose level ``0`` is the labels, also listed under ``labels/<name>``).
    labels : (Z, Y, X) array-like of int or bool
        Non-negative integer labels. They are written as the smallest unsigned type
        that holds the largest label (uint8, uint16, uint32 or uint64). Label TIFFs
        above 65535 are written as plain (not ImageJ) TIFF, as ImageJ reads only 8 and
        16 bits.
    voxel_size : tuple of 3 positive floats, optional
        ``(z, y, x)`` in micrometre. When missing but ``affine`` is given, the column
        norms of the affine are used.
    affine : (4, 4) array-like, optional
        NIfTI affine over file indices ``(x, y, z)`` (as :attr:`Volume.affine`). For NIfTI
        it takes precedence over ``voxel_size``; otherwise a diagonal affine is built
        from ``voxel_size`` (or the identity).
    name : str, optional
        Name of the label image in a Zarr store; defaults to the file name stem.
    overwrite : bool
        Replace what is at ``path``: a file, or a Zarr store that is not a
        napari-ssl-seg project. False refuses any existing path.

    Returns
    -------
    Path
        The path written. The data goes to a temporary name beside it and is renamed
        at the end, so a failed write leaves no half-written target (and leaves an
        existing target untouched).

    Raises
    ------
    PathExistsError
        ``path`` exists and ``overwrite`` is False.
    """
    path = check_output_path(path, overwrite=overwrite)  # before reading a lazy volume
    kind = _write_format(path)
    labels = _compact_labels(labels)
    voxel_size = _check_voxel_size(voxel_size)
    if affine is not None:
        affine = _check_affine(affine)
        if voxel_size is None:
            voxel_size = _voxel_size_from_affine(affine)
    name = name or _stem(path)

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial{_suffix(path)}")
    try:
        if kind == "tiff":
            _formats.write_tiff(tmp, labels, voxel_size)
        elif kind == "nifti":
            _formats.write_nifti(tmp, labels, voxel_size, affine)
        else:
            _ome_zarr.write_label_image(tmp, labels, voxel_size=voxel_size, name=name)
        _replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return path


# --- reading ---------------------------------------------------------------------------


def _open(path: Path, *, lazy: bool) -> Volume:
    if not path.exists():
        raise FileNotFoundError(f"cannot open {str(path)!r}: no such file or directory")
    kind = detect_format(path)
    if kind is None:
        allowed = ", ".join(s for group in SUFFIXES.values() for s in group)
        raise UnsupportedFileError(
            f"cannot open {str(path)!r}: unknown file type {_suffix(path)!r} "
            f"(supported: {allowed})"
        )
    if kind == "zarr":
        if not path.is_dir():
            raise UnsupportedFileError(f"cannot open {str(path)!r}: a .zarr must be a directory")
    elif path.is_dir():
        raise UnsupportedFileError(f"cannot open {str(path)!r}: it is a directory, not a file")
    elif path.stat().st_size == 0:
        raise UnsupportedFileError(f"cannot open {str(path)!r}: the file is empty (0 bytes)")

    try:
        data, voxel_size, affine, close = _OPENERS[kind](path)
        volume = Volume(data, voxel_size, affine, path, _close=close)
    except (InvalidInputError, UnsupportedFileError):
        raise
    except Exception as exc:  # any library error means the file is damaged or foreign
        raise _unreadable(path, kind, exc) from exc
    try:
        _check_volume(volume)
        if lazy:
            return volume
        return Volume(_load(volume, kind), volume.voxel_size, volume.affine, path)
    except (InvalidInputError, UnsupportedFileError):
        volume.close()
        raise
    except Exception as exc:  # the header was fine, the data is not
        volume.close()
        raise _unreadable(path, kind, exc) from exc
    finally:
        if not lazy:
            volume.close()


def _unreadable(path: Path, kind: str, exc: Exception) -> UnsupportedFileError:
    return UnsupportedFileError(
        f"cannot read {str(path)!r} as {kind.upper()} (corrupt or truncated?): "
        f"{type(exc).__name__}: {exc}"
    )


def _load(volume: Volume, kind: str) -> np.ndarray:
    if isinstance(volume.data, np.memmap):
        return np.array(volume.data)  # a copy, detached from the file
    if kind == "tiff":
        import tifffile

        return tifffile.imread(volume.path, series=0, level=0)  # 6x faster than via zarr
    return np.asarray(volume.data[...])


def _check_volume(volume: Volume) -> None:
    data, where = volume.data, str(volume.path)
    if len(data.shape) != 3:
        raise InvalidInputError(
            f"{where!r} holds data of shape {tuple(data.shape)} ({len(data.shape)}D); "
            "need a 3D volume (z, y, x)"
        )
    kind = np.dtype(data.dtype).kind
    if kind not in "biuf":
        raise InvalidInputError(
            f"{where!r} holds {np.dtype(data.dtype)} data; need numbers (int, uint, float)"
        )


# --- writing ---------------------------------------------------------------------------


def _write_format(path: Path) -> str:
    name = path.name.lower()
    for kind, suffixes in SUFFIXES.items():
        if name.endswith(suffixes) and name not in suffixes:
            return kind
    allowed = ", ".join(s for group in SUFFIXES.values() for s in group)
    raise UnsupportedFileError(
        f"cannot write labels to {str(path)!r}: need a file name ending in one of {allowed}"
    )


def _compact_labels(labels: Any) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 3:
        raise InvalidInputError(
            f"labels must be a 3D (z, y, x) array, got shape {array.shape} ({array.ndim}D)"
        )
    if array.dtype.kind not in "biu":
        raise InvalidInputError(
            f"labels must have an integer dtype, got {array.dtype}; "
            "round or cast float predictions to integers first"
        )
    if array.size == 0:
        raise InvalidInputError(f"labels must not be empty, got shape {array.shape}")
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise InvalidInputError(f"labels must be >= 0, got a minimum of {low}")
    dtype = next(d for d in (np.uint8, np.uint16, np.uint32, np.uint64) if high <= np.iinfo(d).max)
    return array.astype(dtype, copy=False)


def _check_voxel_size(voxel_size: Any) -> tuple[float, float, float] | None:
    if voxel_size is None:
        return None
    try:
        values = tuple(float(v) for v in voxel_size)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise InvalidInputError(
            f"voxel_size must be 3 positive finite numbers (z, y, x), got {voxel_size!r}"
        )
    return values  # type: ignore[return-value]


def _check_affine(affine: Any) -> np.ndarray:
    array = np.asarray(affine, dtype=float)
    if array.shape != (4, 4) or not np.isfinite(array).all():
        raise InvalidInputError(f"affine must be a finite (4, 4) matrix, got shape {array.shape}")
    return array


def _voxel_size_from_affine(affine: np.ndarray) -> tuple[float, float, float] | None:
    zooms = np.linalg.norm(affine[:3, :3], axis=0)[::-1]  # file axes x, y, z -> z, y, x
    return tuple(float(z) for z in zooms) if (zooms > 0).all() else None


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check that :func:`write_labels` may write ``path``, before any work is done.

    Raises
    ------
    UnsupportedFileError
        Not a name :func:`write_labels` understands.
    FileNotFoundError
        The folder does not exist.
    PathExistsError
        ``path`` exists and ``overwrite`` is False.
    FileExistsError, ProjectError
        ``overwrite`` is True but ``path`` is a directory that is not a Zarr store, or
        a napari-ssl-seg project: neither is ever replaced.
    """
    path = Path(path)
    kind = _write_format(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist"
        )
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise PathExistsError(path)
    if kind != "zarr" and path.is_dir():
        raise IsADirectoryError(f"cannot write {str(path)!r}: a directory of that name exists")
    if kind == "zarr" and path.exists():
        _ome_zarr.check_replaceable(path)
    return path


def _replace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` onto ``target``; a directory target is swapped, not merged.

    A file is replaced atomically. A directory needs two renames: between them the
    target is briefly absent, and a crash there leaves the old store beside it as
    ``.<name>.<token>.old``.
    """
    if not target.is_dir():
        os.replace(tmp, target)
        return
    backup = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# --- names -----------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz", ".ome.zarr", ".ome.tiff", ".ome.tif"):
        if name.endswith(suffix) and name != suffix:
            return suffix
    return path.suffix.lower()


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(_suffix(path))] or path.name
