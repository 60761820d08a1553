"""The development suite's cases (benchmarks/dev_cases.py) stress what they claim to."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from dev_cases import (  # noqa: E402
    CASES,
    bias_field,
    evenly_spaced_slices,
    make_case,
    rim_classes,
)

from napari_ssl_seg._sample_data import load_nuclei  # noqa: E402


def fg_slices(case):
    other = tuple(a for a in range(3) if a != case.axis)
    return (case.truth > 0).any(axis=other)


@pytest.mark.parametrize("name", list(CASES))
def test_every_case_is_a_valid_task(name):
    case = make_case(name, seed=0)
    assert case.image.dtype == np.uint16 and case.truth.dtype == np.uint8
    assert case.image.shape == case.truth.shape
    assert case.image.std() > 0
    n = case.truth.shape[case.axis]
    assert len(set(case.annotated)) == len(case.annotated) >= 1
    assert all(0 <= z < n for z in case.annotated)
    # Every annotated slice shows every class, and something is left to score.
    for z in case.annotated:
        plane = np.take(case.truth, z, axis=case.axis)
        assert set(case.classes) <= set(np.unique(plane).tolist())
    assert len(case.annotated) < n


def test_cases_are_deterministic_and_seeded():
    a, b = make_case("bias-rician-3", 0), make_case("bias-rician-3", 0)
    np.testing.assert_array_equal(a.image, b.image)
    c = make_case("bias-rician-3", 1)
    assert not np.array_equal(a.image, c.image)
    np.testing.assert_array_equal(a.truth, c.truth)


def test_tiny_objects_are_tiny_and_on_few_slices():
    case = make_case("tiny-2")
    assert case.classes == [1]
    assert 0 < (case.truth == 1).mean() < 0.01
    assert fg_slices(case).mean() < 0.5  # most slices empty, and those are scored
    assert len(case.annotated) == 2 and fg_slices(case)[case.annotated].all()


def test_thin_rim_class_is_present_and_thin():
    case = make_case("thin-rim-3")
    assert case.classes == [1, 2]
    interior, rim = (case.truth == 1), (case.truth == 2)
    assert 0.01 < rim.mean() < interior.mean() / 2
    _, truth, _ = load_nuclei()
    np.testing.assert_array_equal(interior | rim, truth > 0)
    # No rim pixel lies more than 2 pixels (4-connected) inside a nucleus.
    from scipy import ndimage

    for z in np.flatnonzero(rim.any(axis=(1, 2))):
        deep = ndimage.binary_erosion(truth[z] > 0, iterations=2, border_value=1)
        assert not (rim[z] & deep).any()
        assert ((truth[z] > 0) & ~deep == rim[z]).all()


def test_rim_of_a_square_is_two_pixels_wide():
    truth = np.zeros((1, 12, 12), np.uint8)
    truth[0, 2:10, 2:10] = 1
    out = rim_classes(truth, width=2)
    assert (out[0, 4:8, 4:8] == 1).all()
    assert (out[0, 2:10, 2:10] == 2).sum() == 64 - 16


def test_anisotropic_keeps_every_third_slice_and_says_so():
    image, truth, voxel = load_nuclei()
    case = make_case("anisotropic-3")
    np.testing.assert_array_equal(case.image, image[::3])
    np.testing.assert_array_equal(case.truth, truth[::3])
    assert case.image.shape == (20, 256, 256)
    assert case.voxel_size == pytest.approx((voxel[0] * 3, voxel[1], voxel[2]))


def test_other_axis_annotates_along_it():
    case = make_case("axis2-3")
    assert case.axis == 2
    assert max(case.annotated) >= make_case("sample-3").image.shape[0]


def test_inverted_contrast_darkens_the_nuclei():
    case, sample = make_case("inverted-3"), make_case("sample-3")
    fg = sample.truth > 0
    assert sample.image[fg].mean() > sample.image[~fg].mean()
    assert case.image[fg].mean() < case.image[~fg].mean()
    assert (case.image.min(), case.image.max()) == (sample.image.min(), sample.image.max())


def test_bias_field_is_smooth_and_spans_its_range():
    field = bias_field((10, 32, 32), seed=3)
    assert field.min() == pytest.approx(0.4) and field.max() == pytest.approx(1.6)
    assert np.abs(np.diff(field, axis=2)).max() < 0.2


def test_evenly_spaced_slices_picks_slices_with_every_class():
    truth = np.zeros((10, 4, 4), np.uint8)
    truth[2:8, 0, 0] = 1
    truth[4:9, 1, 1] = 2
    assert evenly_spaced_slices(truth, 2) == [5, 7]
    with pytest.raises(ValueError, match="n must be in 1..4"):
        evenly_spaced_slices(truth, 5)


def test_unknown_case_is_named():
    with pytest.raises(ValueError, match="unknown case 'nope'"):
        make_case("nope")
