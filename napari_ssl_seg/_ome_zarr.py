"""The small part of OME-Zarr (NGFF 0.4 read, 0.5 read/write) that :mod:`.io` needs.

Written by hand with zarr-python 3 so that no OME library is required. A label file
written here is an NGFF 0.5 image group (Zarr v3)::

    name.zarr/
      zarr.json        ome: {version: "0.5", multiscales: [{axes z/y/x, datasets: ["0"]}]}
      0/               the labels (z, y, x), unsigned int, dimension_names z/y/x
      labels/
        zarr.json      ome: {version: "0.5", labels: [name]}
        <name>/
          zarr.json    ome: {version: "0.5", multiscales: [...], image-label: {...}}
          0/           the same labels again

The top-level image is the labels themselves, so viewers that only read images show the
data, and readers of ``labels/`` (napari-ome-zarr, Fiji/MoBIE) show it as a label
overlay of its own image.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path
from typing import Any

import numpy as np

from napari_ssl_seg.errors import InvalidInputError, ProjectError, UnsupportedFileError

NGFF_VERSION = "0.5"
AXES = ("z", "y", "x")
UNIT = "micrometer"  # voxel sizes given to write_labels are in micrometre
MAX_COLORS = 256  # more distinct labels than this: leave the colours to the viewer


def open_zarr(path: Path) -> tuple:
    """Open a plain Zarr array or an OME-Zarr image group: ``(data, voxel_size, None, None)``."""
    import zarr

    node = zarr.open(path, mode="r")
    if isinstance(node, zarr.Array):
        return node, None, None, None
    data, voxel_size = read_image(node, where=str(path))
    return data, voxel_size, None, None


def read_image(group: Any, *, where: str) -> tuple[Any, tuple[float, float, float] | None]:
    """Return level 0 of the first multiscale of an OME-Zarr image group and its scale.

    Parameters
    ----------
    group : zarr.Group
        An NGFF 0.5 (``attributes["ome"]``) or 0.4 (top-level ``multiscales``) image.
    where : str
        The path, for error messages.

    Returns
    -------
    data : (Z, Y, X) zarr.Array
    voxel_size : tuple of 3 floats or None
        The level-0 ``scale`` times any multiscale-wide ``scale``.
    """
    attrs = group.attrs.asdict()
    ome = attrs.get("ome", attrs)  # 0.5 nests under "ome"; 0.4 keeps it at the top
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
    if not multiscales:
        arrays = sorted(name for name, _ in group.arrays())
        hint = ""
        if "napari_ssl_seg" in attrs:
            hint = "; it is a napari-ssl-seg project: open it with store.Project.open"
        raise UnsupportedFileError(
            f"{where!r} is a Zarr group without OME-Zarr 'multiscales' metadata "
            f"(arrays in it: {arrays}){hint}"
        )
    multiscale = multiscales[0]
    level0 = multiscale["datasets"][0]
    data = group[level0["path"]]
    axes = multiscale.get("axes") or []
    names = tuple(a["name"] if isinstance(a, dict) else str(a) for a in axes)
    types = {a.get("type", "space") for a in axes if isinstance(a, dict)}
    if data.ndim != 3 or types - {"space"}:
        raise InvalidInputError(
            f"{where!r} holds an image of shape {tuple(data.shape)} with axes {names}; "
            "need a 3D volume (z, y, x)"
        )
    scale = _scale(level0)
    if scale is not None and (outer := _scale(multiscale)) is not None:
        scale = tuple(a * b for a, b in zip(scale, outer, strict=True))
    return data, scale


def write_label_image(
    path: Path, labels: np.ndarray, *, voxel_size: tuple | None, name: str
) -> None:
    """Write ``labels`` as an NGFF 0.5 image group with itself under ``labels/<name>``.

    ``labels`` is a (Z, Y, X) unsigned integer ndarray (checked by the caller); ``path``
    must not exist yet.
    """
    import zarr

    name = name.replace("/", "_").lstrip("_") or "labels"
    root = zarr.create_group(
        store=str(path),
        zarr_format=3,
        attributes=_ome(multiscales=[_multiscale(name, voxel_size)]),
    )
    _write_level(root, labels)
    group = root.create_group("labels", attributes=_ome(labels=[name]))
    image_label = {"source": {"image": "../../"}}
    colors = _colors(labels)
    if colors:
        image_label["colors"] = colors
    label_group = group.create_group(
        name,
        attributes=_ome(
            multiscales=[_multiscale(name, voxel_size)], **{"image-label": image_label}
        ),
    )
    _write_level(label_group, labels)


def check_replaceable(path: Path) -> None:
    """Refuse to overwrite anything at ``path`` but a Zarr store that is not a project."""
    if not path.is_dir():
        raise FileExistsError(f"cannot write {str(path)!r}: a file of that name exists")
    meta = path / "zarr.json"
    if not any((path / m).is_file() for m in ("zarr.json", ".zarray", ".zgroup")):
        raise FileExistsError(
            f"cannot write {str(path)!r}: the directory exists and is not a Zarr store; "
            "refusing to replace it"
        )
    if meta.is_file():
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):
            attrs = {}
        if "napari_ssl_seg" in attrs:
            raise ProjectError(
                f"cannot write labels to {str(path)!r}: it is a napari-ssl-seg project; "
                "refusing to replace it"
            )


def _scale(node: dict) -> tuple[float, ...] | None:
    for transform in node.get("coordinateTransformations") or []:
        if transform.get("type") == "scale" and "scale" in transform:
            return tuple(float(s) for s in transform["scale"])
    return None


def _ome(**metadata: Any) -> dict:
    return {"ome": {"version": NGFF_VERSION, **metadata}}


def _multiscale(name: str, voxel_size: tuple | None) -> dict:
    if voxel_size is None:  # the spec requires a scale; without a size it is unitless 1
        axes = [{"name": a, "type": "space"} for a in AXES]
        scale = [1.0, 1.0, 1.0]
    else:
        axes = [{"name": a, "type": "space", "unit": UNIT} for a in AXES]
        scale = [float(v) for v in voxel_size]
    transform = [{"type": "scale", "scale": scale}]
    return {
        "name": name,
        "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": transform}],
    }


def _write_level(group: Any, labels: np.ndarray) -> None:
    chunks = tuple(min(n, c) for n, c in zip(labels.shape, (32, 256, 256), strict=True))
    array = group.create_array(
        "0",
        shape=labels.shape,
        dtype=labels.dtype,
        chunks=chunks,
        fill_value=0,
        dimension_names=AXES,  # NGFF 0.5 requires them, matching the axes
    )
    array[...] = labels


def _colors(labels: np.ndarray) -> list[dict]:
    """One colour per label present (0 transparent), or none for many instance labels."""
    values = np.unique(labels)
    if values.size > MAX_COLORS:
        return []
    return [{"label-value": int(v), "rgba": _rgba(int(v))} for v in values]


def _rgba(value: int) -> list[int]:
    if value == 0:
        return [0, 0, 0, 0]
    hue = (value * 0.618033988749895) % 1.0  # golden-ratio hues: neighbours differ
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.8, 1.0)
    return [round(red * 255), round(green * 255), round(blue * 255), 255]
