"""Tests of the napari writer contribution, without a viewer."""

import numpy as np
import pytest

from napari_ssl_seg import _writer, io
from napari_ssl_seg.errors import InvalidInputError


@pytest.fixture
def labels():
    data = np.zeros((3, 8, 9), np.int32)
    data[1, 2:4, 3:6] = 1
    return data


@pytest.mark.parametrize("name", ["a.tif", "a.nii.gz", "a.zarr"])
def test_writes_voxel_size_from_scale(tmp_path, labels, name):
    meta = {"name": "seg", "scale": (0.29, 0.26, 0.26), "metadata": {}}
    written = _writer.write_labels_layer(str(tmp_path / name), labels, meta)
    assert written == [str(tmp_path / name)]
    volume = io.read_volume(tmp_path / name)
    np.testing.assert_array_equal(volume.data, labels)
    assert volume.voxel_size == pytest.approx((0.29, 0.26, 0.26))


def test_unit_scale_means_unknown_and_affine_comes_back(tmp_path, labels):
    _writer.write_labels_layer(str(tmp_path / "a.tif"), labels, {"scale": (1.0, 1.0, 1.0)})
    assert io.read_volume(tmp_path / "a.tif").voxel_size is None
    affine = np.diag([0.5, 0.4, 2.0, 1.0])
    meta = {"scale": (2.0, 0.4, 0.5), "metadata": {"napari_ssl_seg_affine": affine}}
    _writer.write_labels_layer(str(tmp_path / "a.nii.gz"), labels, meta)
    np.testing.assert_allclose(io.read_volume(tmp_path / "a.nii.gz").affine, affine)


def test_bad_inputs(tmp_path, labels):
    with pytest.raises(InvalidInputError, match="integer dtype, got float64"):
        _writer.write_labels_layer(str(tmp_path / "a.tif"), labels * 0.5, {})
