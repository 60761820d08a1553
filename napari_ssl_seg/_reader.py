"""napari reader contribution: volumes (tif, NIfTI, Zarr) and napari-ssl-seg projects.

Thin: the reading itself lives in :mod:`napari_ssl_seg.io` and
:mod:`napari_ssl_seg.store`. Nothing here imports napari; layers are returned as
``(data, kwargs, layer_type)`` tuples.

What becomes which layer
------------------------
* A project directory (a Zarr v3 group whose root ``zarr.json`` has
  ``attributes["napari_ssl_seg"]``): see :func:`read_project_layers`.
* Any other volume is an Image layer, scaled by its voxel size; in memory up to
  512 MiB, lazy above. A file cannot say that
  it holds labels, so by convention an integer volume whose file name contains
  ``label`` (``nuclei_labels.tif``, ``labels.nii.gz``...) is read as a Labels layer,
  loaded into memory so that it can be painted.
* The NIfTI affine is not applied (it may rotate or flip the volume); only the voxel
  size is, and the affine is kept in ``metadata["napari_ssl_seg_affine"]`` so that
  saving the labels as NIfTI again restores it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from napari_ssl_seg.io import detect_format, open_volume, read_volume

LayerData = tuple  # (data, kwargs, layer_type)
PROJECT_KEY = "napari_ssl_seg_project"
AFFINE_KEY = "napari_ssl_seg_affine"
#: Volumes up to this size are read into memory (fast slicing, no open file); larger
#: ones stay lazy (memory map, Zarr, NIfTI proxy).
IN_MEMORY_BYTES = 512 * 2**20


def get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """Return a reader for ``path`` if this plugin can read it, else None.

    Only the name is looked at (and, for directories, the Zarr metadata file), so this
    is cheap; errors in the file itself are raised by the returned function.
    """
    if isinstance(path, list | tuple):
        if len(path) != 1:  # a stack of files is not one volume
            return None
        path = path[0]
    path = Path(path)
    if is_project(path):
        return _read_project
    if detect_format(path) is None:
        return None
    return _read_volume


def is_project(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory whose root ``zarr.json`` marks a project."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attributes = json.loads(meta.read_text(encoding="utf-8")).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return "napari_ssl_seg" in attributes


def read_project_layers(path: str | os.PathLike) -> list[LayerData]:
    """The layers of a project, bottom to top.

    ``image`` (Image, lazy), ``confidence · round N`` (Image, magma, 0..1, hidden) and
    ``pseudo-labels · round N`` (Labels: corrections > annotations > latest pseudo-labels)
    when a round exists, then ``annotations`` (Labels, on top so it is the one selected
    for painting). Every layer carries ``metadata["napari_ssl_seg_project"]``.
    """
    from napari_ssl_seg.store import Project  # lazy: only projects need the store

    path = Path(path)
    project = Project.open(path)
    common = {"metadata": {PROJECT_KEY: str(path)}}
    if project.voxel_size is not None:
        common["scale"] = tuple(project.voxel_size)
    layers: list[LayerData] = [(project.image, {"name": "image", **common}, "image")]
    latest = int(project.latest_round)
    if latest > 0:
        confidence = {
            "name": f"confidence · round {latest}",
            "colormap": "magma",
            "contrast_limits": (0.0, 1.0),
            "visible": False,  # drawn over the image it would hide it; shown on demand
            **common,
        }
        layers.append((project.confidence(latest), confidence, "image"))
        pseudo = {"name": f"pseudo-labels · round {latest}", **common}
        layers.append((np.asarray(project.merged_labels()), pseudo, "labels"))
    annotations = np.asarray(project.annotations[...])
    layers.append((annotations, {"name": "annotations", **common}, "labels"))
    return layers


def _read_project(path: str | list[str]) -> list[LayerData]:
    return read_project_layers(_single(path))


def _read_volume(path: str | list[str]) -> list[LayerData]:
    path = Path(_single(path))
    volume = open_volume(path)
    metadata: dict = {"napari_ssl_seg_source": str(path)}
    if volume.affine is not None:
        metadata[AFFINE_KEY] = volume.affine
    kwargs: dict = {"name": _layer_name(path), "metadata": metadata}
    if volume.voxel_size is not None:
        kwargs["scale"] = volume.voxel_size
    is_labels = "label" in path.name.lower() and volume.dtype.kind in "biu"
    if is_labels or np.prod(volume.shape) * volume.dtype.itemsize <= IN_MEMORY_BYTES:
        volume.close()  # labels must be in memory to be painted
        volume = read_volume(path)
    return [(volume.data, kwargs, "labels" if is_labels else "image")]


def _single(path: str | list[str]) -> str:
    return path[0] if isinstance(path, list | tuple) else path


def _layer_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.zarr", ".ome.tiff", ".ome.tif", ".nii.gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name
