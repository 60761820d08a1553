"""TIFF and NIfTI reading and writing for :mod:`napari_ssl_seg.io` (headless).

Openers return ``(data, voxel_size, affine, close)``: ``data`` lazy and in file order
made ``(z, y, x)``, ``close`` a callable that releases a file handle, or None.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from napari_ssl_seg.errors import InvalidInputError

Opened = tuple[Any, "tuple[float, float, float] | None", "np.ndarray | None", Any]


def open_tiff(path: Path) -> Opened:
    """Series 0, level 0: memory-mapped if uncompressed, else through a Zarr store."""
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if "S" in series.axes:
            raise InvalidInputError(
                f"{str(path)!r} holds {series.axes} data of shape {series.shape} with "
                "colour samples; need a single-channel 3D volume (z, y, x) (tifffile "
                "writes 3 or 4 planes as RGB unless given photometric='minisblack')"
            )
        voxel_size = tiff_voxel_size(tif)
        mappable = series.dataoffset is not None and len(tif.series) == 1
    if mappable:
        return tifffile.memmap(path, mode="r"), voxel_size, None, None
    store = tifffile.imread(path, aszarr=True, series=0, level=0)
    return zarr.open_array(store, mode="r"), voxel_size, None, store.close


def tiff_voxel_size(tif: Any) -> tuple[float, float, float] | None:
    """ImageJ spacing/resolution, else tifffile JSON ``voxel_size``, else OME-XML."""
    page = tif.pages.first
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
        if "spacing" in meta and xres is not None and yres is not None:
            to_size = lambda tag: tag.value[1] / tag.value[0]  # noqa: E731 pixels/unit
            return (float(meta["spacing"]), to_size(yres), to_size(xres))
    if tif.is_shaped and "voxel_size" in (tif.shaped_metadata or [{}])[0]:
        return tuple(float(v) for v in tif.shaped_metadata[0]["voxel_size"])
    if tif.is_ome:
        pixels = [e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels")]
        sizes = [pixels[0].get(f"PhysicalSize{a}") for a in "ZYX"] if pixels else [None]
        if None not in sizes:
            return tuple(float(s) for s in sizes)
    return None


def open_nifti(path: Path) -> Opened:
    """The nibabel proxy seen as (z, y, x), the zooms reversed, the affine as stored."""
    import nibabel

    image = nibabel.load(path)
    proxy = image.dataobj
    if len(proxy.shape) != 3:
        return proxy, None, None, None  # the caller reports the shape
    zooms = image.header.get_zooms()[:3]
    # zooms are float32: print them at float32 precision so 0.26 stays 0.26
    voxel_size = tuple(float(str(np.float32(z))) for z in reversed(zooms))
    affine = np.asarray(image.affine, dtype=float)
    return ReversedAxes(proxy), voxel_size, affine, None


class ReversedAxes:
    """Lazy ``(z, y, x)`` view of a nibabel proxy stored ``(x, y, z)``."""

    def __init__(self, source: Any):
        self._source = source
        self.shape = tuple(reversed(source.shape))
        self.ndim = len(self.shape)
        # scaled NIfTI (scl_slope) read as float: ask the proxy with a one-voxel read
        self.dtype = np.asarray(source[(slice(0, 1),) * self.ndim]).dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if key.count(Ellipsis) == 1:
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        if len(key) != self.ndim or not all(isinstance(k, slice | int | np.integer) for k in key):
            return np.asarray(self)[key]  # fancy indexing: read everything, then index
        # integer keys drop their axes; the kept ones come back in file order: reverse
        return np.asarray(self._source[key[::-1]]).T

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = np.asarray(self._source).T
        return data if dtype is None else data.astype(dtype)


def write_tiff(path: Path, labels: np.ndarray, voxel_size: tuple | None) -> None:
    """ImageJ hyperstack for 8/16 bit, else a plain TIFF with JSON metadata; zlib."""
    import tifffile

    options: dict[str, Any] = {"compression": "zlib"}
    if labels.dtype.itemsize <= 2:  # ImageJ reads 8 and 16 bit only
        metadata: dict[str, Any] = {"axes": "ZYX"}
        if voxel_size is not None:
            metadata.update(spacing=voxel_size[0], unit="micron")
            options["resolution"] = (1 / voxel_size[2], 1 / voxel_size[1])
        tifffile.imwrite(path, labels, imagej=True, metadata=metadata, **options)
        return
    metadata = {"axes": "ZYX"}
    if voxel_size is not None:
        metadata.update(voxel_size=list(voxel_size), unit="micrometer")
    tifffile.imwrite(path, labels, photometric="minisblack", metadata=metadata, **options)


def write_nifti(path: Path, labels: np.ndarray, voxel_size: tuple | None, affine: Any) -> None:
    """NIfTI-1 in file order (x, y, z); the affine given, or one from the voxel size."""
    import nibabel

    built = affine is None
    if built:
        zooms = (1.0, 1.0, 1.0) if voxel_size is None else voxel_size[::-1]
        affine = np.diag([*zooms, 1.0])
    image = nibabel.Nifti1Image(labels.T, affine, dtype=labels.dtype)  # file order x, y, z
    if built and voxel_size is not None:
        image.header.set_xyzt_units("micron")
    nibabel.save(image, path)
