"""napari writer contribution: a Labels layer to .tif/.tiff, .nii/.nii.gz or .zarr.

Thin: :func:`napari_ssl_seg.io.write_labels` does the work. The voxel size comes from the
layer's ``scale`` (napari's default of all ones means "unknown" and is not written); a
NIfTI affine read by this plugin's reader (``metadata["napari_ssl_seg_affine"]``) is
written back.
"""

from __future__ import annotations

from typing import Any

from napari_ssl_seg._reader import AFFINE_KEY
from napari_ssl_seg.io import write_labels


def write_labels_layer(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer; return the path written, as napari expects.

    Label contract: on annotated slices 0 is background and 1..K are classes; voxels
    nobody annotated are tracked separately and are never background.

    Parameters
    ----------
    path : str
        Target file; the extension picks the format.
    data : (Z, Y, X) array-like of int
        The layer's data.
    meta : dict
        The layer's attributes (``scale``, ``name``, ``metadata``...).
    """
    scale = meta.get("scale")
    voxel_size = None
    if scale is not None and len(scale) == 3 and any(float(s) != 1.0 for s in scale):
        voxel_size = tuple(float(s) for s in scale)
    affine = (meta.get("metadata") or {}).get(AFFINE_KEY)
    # napari's save dialog asks before it replaces a file, and a script that calls
    # viewer.layers.save(path) names the path itself.
    written = write_labels(
        path,
        data,
        voxel_size=voxel_size,
        affine=affine,
        name=meta.get("name") or None,
        overwrite=True,
    )
    return [str(written)]
