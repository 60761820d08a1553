"""Tests of the label contract: image and label checks, slice lists, merging."""

import numpy as np
import pytest

from napari_ssl_seg.errors import InvalidInputError
from napari_ssl_seg.labels import (
    LABEL_DTYPE,
    MAX_CLASSES,
    check_image,
    check_labels,
    labelled_slices,
    merge_labels,
    parse_slice_list,
)


class LazyVolume:
    """An array-like that records what is read and refuses to be read whole."""

    def __init__(self, data):
        self._data = data
        self.shape, self.dtype = data.shape, data.dtype
        self.reads = []

    def __getitem__(self, index):
        self.reads.append(index)
        return self._data[index]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole volume was read")


# ------------------------------------------------------------------ check_image
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64, bool])
def test_check_image_accepts_numeric_volumes(dtype):
    check_image(np.zeros((2, 3, 4), dtype))


def test_check_image_accepts_nested_lists():
    check_image([[[1, 2], [3, 4]]])


def test_check_image_never_reads_an_integer_volume():
    lazy = LazyVolume(np.zeros((4, 5, 6), np.uint16))
    check_image(lazy)
    assert lazy.reads == []


def test_check_image_scans_a_float_volume_block_by_block():
    lazy = LazyVolume(np.zeros((4, 5, 6), np.float32))
    check_image(lazy)
    assert lazy.reads  # scanned for NaN, through slicing only (__array__ would raise)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (
            np.zeros((4, 4)),
            r"expected a 3D volume \(Z, Y, X\), got 2 dimension\(s\) with shape \(4, 4\)",
        ),
        (np.zeros((2, 3, 4, 5)), r"got 4 dimension\(s\) with shape \(2, 3, 4, 5\)"),
        (np.zeros((0, 3, 4)), r"the volume is empty \(shape \(0, 3, 4\)\)"),
        (np.zeros((2, 3, 4), complex), "expected numeric voxels, got dtype complex128"),
        (np.full((2, 3, 4), "a"), "expected numeric voxels, got dtype <U1"),
    ],
)
def test_check_image_bad_inputs(image, match):
    with pytest.raises(InvalidInputError, match=match):
        check_image(image, name="vol.tif")


@pytest.mark.parametrize(("value", "word"), [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_check_image_rejects_non_finite_values(value, word):
    image = np.zeros((3, 4, 4), np.float32)
    image[2, 1, 1] = value
    with pytest.raises(InvalidInputError, match=rf"vol\.tif: the image holds {word} values"):
        check_image(image, name="vol.tif")


def test_check_image_errors_are_value_errors():
    with pytest.raises(ValueError, match="3D volume"):
        check_image(np.zeros(5))


# ----------------------------------------------------------------- check_labels
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, bool])
def test_check_labels_accepts_integer_labels(dtype):
    check_labels(np.ones((2, 3, 4), dtype), shape=(2, 3, 4))


def test_check_labels_accepts_nested_lists():
    check_labels([[[0, 1], [2, 3]]], shape=(1, 2, 2))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.zeros((2, 3, 4), np.float32), r"ann: labels must be integers .* got dtype float32"),
        (np.full((2, 3, 4), -1, np.int8), r"ann: labels must be >= 0, found -1"),
        (
            np.zeros((2, 3, 5), np.uint8),
            r"ann: shape \(2, 3, 5\) does not match the image shape \(2, 3, 4\)",
        ),
        (
            np.zeros((2, 3), bool),
            r"ann: shape \(2, 3\) does not match the image shape \(2, 3, 4\)",
        ),
        (np.full((2, 3, 4), 70000, np.uint32), "ann: label 70000 is larger than 65535"),
    ],
)
def test_check_labels_bad_inputs(labels, match):
    with pytest.raises(InvalidInputError, match=match):
        check_labels(labels, shape=(2, 3, 4), name="ann")


def test_check_labels_refuses_more_classes_than_allowed():
    instances = np.arange(2 * 30 * 30, dtype=np.uint16).reshape(2, 30, 30)  # one per voxel
    message = (
        r"ann: looks like an instance image or an intensity image: 1800 distinct values / "
        r"max label 1799; convert it to classes 0\.\.K-1 or pass --max-classes"
    )
    with pytest.raises(InvalidInputError, match=message):
        check_labels(instances, name="ann", max_classes=MAX_CLASSES)
    check_labels(instances, name="ann", max_classes=1799)
    check_labels(instances, name="ann")  # only the stored uint16 bounds a single edit
    with pytest.raises(InvalidInputError, match="max label 1799"):
        check_labels(instances, name="ann", max_classes=1000)
    assert MAX_CLASSES == 255
    check_labels(np.full((2, 3, 4), 255, np.uint8), max_classes=MAX_CLASSES)
    with pytest.raises(InvalidInputError, match="1 distinct values / max label 256"):
        check_labels(np.full((2, 3, 4), 256, np.uint16), max_classes=MAX_CLASSES)
    with pytest.raises(InvalidInputError, match="max_classes must be an integer >= 1, got 0"):
        check_labels(np.zeros((2, 3, 4), np.uint8), max_classes=0)


# ------------------------------------------------------------- parse_slice_list
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3,17,40", [3, 17, 40]),
        ("3-5,9", [3, 4, 5, 9]),
        (" 9 , 3-4,3,", [3, 4, 9]),
        ("7-7", [7]),
        ("0", [0]),
        ("0-49", list(range(50))),
    ],
)
def test_parse_slice_list(text, expected):
    assert parse_slice_list(text, length=50) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a", r"slices: 'a' is not a slice index \(expected e\.g\. '3,17,40' or '3-5'\)"),
        ("3,x", "'x' is not a slice index"),
        ("1.5", "'1.5' is not a slice index"),
        ("3-", "'3-' is not a slice index"),
        ("3-5-7", "'3-5-7' is not a slice index"),
        ("3;4", "'3;4' is not a slice index"),
        ("50", r"slice\(s\) \[50\] outside 0\.\.49"),
        ("-1", r"slice\(s\) \[-1\] outside 0\.\.49"),
        ("2,60,70", r"slice\(s\) \[60, 70\] outside 0\.\.49"),
        ("45-55", r"slice\(s\) \[55\] outside 0\.\.49"),
        ("0-10000000000000", r"\[10000000000000\] outside 0\.\.49"),  # not expanded first
        ("5-3", "range '5-3' runs backwards; write '3-5'"),
        ("", "slices: no slice given"),
        (" , ,", "no slice given"),
    ],
)
def test_parse_slice_list_bad_inputs(text, match):
    with pytest.raises(InvalidInputError, match=match):
        parse_slice_list(text, length=50)


def test_parse_slice_list_names_the_field():
    with pytest.raises(InvalidInputError, match="^train slices: 'q'"):
        parse_slice_list("q", length=5, name="train slices")


# --------------------------------------------------------------- labelled_slices
def test_labelled_slices_along_each_axis():
    labels = np.zeros((4, 5, 6), np.uint16)
    labels[1, 2, 3] = 1
    labels[3, 0, 5] = 2
    assert labelled_slices(labels) == [1, 3]
    assert labelled_slices(labels, axis=1) == [0, 2]
    assert labelled_slices(labels, axis=2) == [3, 5]
    assert labelled_slices(np.zeros((4, 5, 6), np.uint16)) == []


# ------------------------------------------------------------------ merge_labels
def _blocks():
    """One row of voxels covering every combination of the three sources."""
    pseudo = np.array([5, 5, 5, 5, 5, 5], np.uint16)
    annotations = np.array([0, 1, 0, 2, 0, 0], np.uint16)
    annotated = np.array([0, 1, 1, 1, 0, 0], np.uint8)  # voxel 2: annotated background
    corrections = np.array([0, 0, 0, 3, 4, 0], np.uint16)
    corrected = np.array([0, 0, 0, 1, 2, 0], np.uint16)  # round corrected, 0 = never
    return pseudo, annotations, annotated, corrections, corrected


def test_merge_labels_priorities():
    pseudo, *human = _blocks()
    merged = merge_labels(pseudo, *human)
    # pseudo | annotation | annotated background | correction over annotation |
    # correction over pseudo | pseudo
    np.testing.assert_array_equal(merged, [5, 1, 0, 3, 4, 5])
    assert merged.dtype == LABEL_DTYPE
    np.testing.assert_array_equal(pseudo, 5)  # the input is not modified


def test_merge_labels_without_a_round():
    _, *human = _blocks()
    np.testing.assert_array_equal(merge_labels(None, *human), [0, 1, 0, 3, 4, 0])


def test_merge_labels_correction_to_background_wins():
    pseudo = np.array([2], np.uint16)
    merged = merge_labels(
        pseudo,
        np.array([1], np.uint16),
        np.array([1], np.uint8),
        np.array([0], np.uint16),
        np.array([1], np.uint16),
    )
    np.testing.assert_array_equal(merged, [0])
