"""Headless logic behind the widget: paint atoms, buffered edits, settings, export."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from napari_ssl_seg import annotation as ann
from napari_ssl_seg.config import PRESETS, TrainConfig
from napari_ssl_seg.errors import InvalidInputError, SignatureMismatchError
from napari_ssl_seg.io import read_volume

SHAPE = (8, 32, 32)


def masked_atom(key, mask):  # napari >= 0.9 brush / fill / polygon atom
    return SimpleNamespace(slice_key=key, mask=mask, old_values=None, new_value=1)


# ------------------------------------------------------------------- atoms
def test_atom_region_masked_form():
    mask = np.zeros((1, 5, 5), bool)
    mask[0, 1:4, 2] = True
    region, got = ann.atom_region(
        masked_atom((slice(2, 3), slice(8, 13), slice(8, 13)), mask), SHAPE
    )
    assert region == (slice(2, 3), slice(8, 13), slice(8, 13))
    np.testing.assert_array_equal(got, mask)
    region, got = ann.atom_region(
        masked_atom((slice(1, 2), slice(None), slice(None)), None), SHAPE
    )
    assert region == (slice(1, 2), slice(0, 32), slice(0, 32)) and got.all()


def test_atom_region_bbox_form():
    old = np.zeros((1, 3, 3), np.uint8)
    new = old.copy()
    new[0, 1, 1] = 4
    region, mask = ann.atom_region(((slice(0, 1), slice(5, 8), slice(5, 8)), old, new), SHAPE)
    assert region == (slice(0, 1), slice(5, 8), slice(5, 8))
    assert mask.sum() == 1 and mask[0, 1, 1]
    assert ann.atom_region(((slice(0, 1), slice(5, 8), slice(5, 8)), old, old), SHAPE) is None


def test_atom_region_coordinate_form():
    index = (np.array([3, 3, 4]), np.array([10, 12, 11]), np.array([5, 5, 6]))
    region, mask = ann.atom_region((index, np.zeros(3), 2), SHAPE)
    assert region == (slice(3, 5), slice(10, 13), slice(5, 7))
    assert mask.sum() == 3 and mask[0, 0, 0] and mask[0, 2, 0] and mask[1, 1, 1]
    empty = (np.array([], int),) * 3
    assert ann.atom_region((empty, np.zeros(0), 1), SHAPE) is None


def test_edit_buffer_merges_touching_boxes_of_one_item_only():
    buffer = ann.EditBuffer(SHAPE)
    # three dabs of one stroke (one history item), touching each other
    buffer.add(
        [((np.array([1]), np.array([5]), np.array([x])), np.zeros(1), 1) for x in (0, 1, 2)]
    )
    buffer.add([((np.array([6]), np.array([30]), np.array([30])), np.zeros(1), 1)])
    buffer.add([((np.array([1]), np.array([5]), np.array([3])), np.zeros(1), 1)])  # another
    assert len(buffer) == 5
    np.testing.assert_array_equal(
        buffer.pending_mask((slice(1, 2), slice(5, 6), slice(1, 5))), [[[1, 1, 1, 0]]]
    )
    boxes = sorted(buffer.take(), key=lambda b: (b.region[0].start, b.seq))
    assert len(buffer) == 0 and len(boxes) == 3
    stroke, other, far = boxes
    assert stroke.region == (slice(1, 2), slice(5, 6), slice(0, 3)) and stroke.mask.all()
    assert other.region == (slice(1, 2), slice(5, 6), slice(3, 4)) and other.seq == 3
    assert far.region == (slice(6, 7), slice(30, 31), slice(30, 31))


# ----------------------------------------------------------------- session
@pytest.mark.parametrize("background", [False, True])
def test_session_flush_writes_touched_boxes(tiny_project, background):
    project, _, labels = tiny_project
    session = ann.AnnotationSession(project, background=background)
    assert session.annotated == {1, 4} and not session.corrected
    data = np.zeros(SHAPE, np.uint16)
    data[6, 10:12, 10:12] = 1
    index = np.nonzero(data)
    session.annotations.add([(index, np.zeros(4), 1)])
    assert session.pending
    if background:
        saved = session.flush_async(data, round=0, merged_round=None).result(30)
    else:
        saved = session.flush(data)
    assert not session.pending and [e.kind for e in saved.edits] == ["annotation"]
    assert saved.edits[0].n_voxels == 4 and saved.edits[0].whole_slices
    assert session.annotated == {1, 4, 6} and project.annotated_slices() == [1, 4, 6]
    np.testing.assert_array_equal(project.annotations[6], data[6])
    session.close()


def paint(data, box, label):
    """Paint ``box`` of ``data`` with ``label`` as napari's data_setitem does; the item."""
    index = tuple(i.ravel() for i in np.mgrid[box])
    old = data[index].copy()
    data[index] = label
    return [(index, old, np.full(old.shape, label, data.dtype))]


def undo(data, item):
    for index, old, _ in reversed(item):
        data[index] = old


def test_strokes_queued_behind_a_busy_writer_are_written_as_one_edit(tiny_project):
    project, _, _ = tiny_project
    session = ann.AnnotationSession(project, background=True)
    data = np.asarray(project.annotations[...]).copy()
    before = len(project.edits())
    futures = []
    with project.writing():  # another writer holds the project: the strokes queue up
        for k in range(6):
            session.add_stroke(
                "annotation", paint(data, np.s_[6:7, 2 + 3 * k : 5 + 3 * k, 2:9], 1)
            )
            futures.append(session.flush_async(data))
    saved = [f.result(30) for f in futures]
    # The first stroke was taken before the writer met the lock; the five others wait
    # behind it and are written together.
    assert sum(len(s.edits) for s in saved) == 2 and len(project.edits()) == before + 2
    np.testing.assert_array_equal(project.annotations[6], data[6])
    assert (project.annotated[6] == 1).all() and 6 in session.annotated
    session.close()


def test_undo_of_one_stroke_written_with_others_reverts_only_its_voxels(tiny_project):
    project, _, _ = tiny_project
    session = ann.AnnotationSession(project, background=True)
    data = np.asarray(project.annotations[...]).copy()
    first = paint(data, np.s_[6:7, 2:8, 2:8], 1)
    second = paint(data, np.s_[6:7, 5:12, 5:12], 2)  # overlaps the first
    session.add_stroke("annotation", first)
    session.add_stroke("annotation", second)
    assert len(session.flush_async(data).result(30).edits) == 1
    undo(data, second)  # Ctrl-Z: the second stroke only
    session.add_undo("annotation", second)
    session.flush_async(data).result(30)
    np.testing.assert_array_equal(project.annotations[6], data[6])
    assert (project.annotations[6, 2:8, 2:8] == 1).all()
    assert (project.annotated[6] == 1).all()  # the first stroke still annotates the slice
    undo(data, first)
    session.add_undo("annotation", first)
    session.flush_async(data).result(30)
    assert not project.annotated[6].any() and 6 not in session.annotated
    assert project.annotated_slices() == [1, 4]
    data[6, 2:8, 2:8] = 1  # redo of the first
    session.add_stroke("annotation", first)
    session.flush_async(data).result(30)
    np.testing.assert_array_equal(project.annotations[6], data[6])
    assert project.annotated_slices() == [1, 4, 6]
    session.close()


def test_session_corrections_and_merged_slices(tiny_project, tiny_config):
    from napari_ssl_seg.engine import run_round

    project, _, _ = tiny_project
    run_round(project, tiny_config())
    session = ann.AnnotationSession(project, background=True)
    layer = project.merged_labels()
    layer[3, 0:2, 0:2] = 7 - layer[3, 0:2, 0:2]  # a correction
    session.corrections.add([((slice(3, 4), slice(0, 2), slice(0, 2)), None, None)])
    layer[5, 1, 1] = 1  # and an annotation of slice 5 on the annotation layer
    annotation_layer = np.zeros(SHAPE, np.uint16)
    annotation_layer[5, 1, 1] = 1
    session.annotations.add([((np.array([5]), np.array([1]), np.array([1])), np.zeros(1), 1)])
    saved = session.flush_async(annotation_layer, layer, round=1, merged_round=1).result(30)
    assert [e.kind for e in saved.edits] == ["correction", "annotation"]
    assert saved.edits[0].round == 1 and saved.edits[0].source == "widget"
    np.testing.assert_array_equal(project.corrections[3, 0:2, 0:2], layer[3, 0:2, 0:2])
    ((region, merged),) = saved.merged  # the whole slice 5, now human background + one voxel
    assert region == (slice(5, 6), slice(0, 32), slice(0, 32))
    np.testing.assert_array_equal(merged, annotation_layer[5:6])
    assert session.corrected == {3}
    session.accept_slice(6, layer, round=1)
    assert (project.corrected[6] == 1).all() and session.corrected == {3, 6}
    session.close()


def test_mark_and_unmark_slices(tiny_project):
    project, _, labels = tiny_project
    session = ann.AnnotationSession(project)
    empty = np.zeros(SHAPE, np.uint16)
    session.mark_annotated(0, empty)
    assert project.annotated_slices() == [0, 1, 4] and (project.annotated[0] == 1).all()
    session.unmark(4)
    assert project.annotated_slices() == [0, 1] and session.annotated == {0, 1}
    assert not project.annotations[4].any()
    session.check_trainable()
    with pytest.raises(InvalidInputError, match="no round to accept yet"):
        session.accept_slice(0, empty, round=0)
    with pytest.raises(InvalidInputError, match=r"slice must be an integer in 0\.\.7, got 8"):
        session.mark_annotated(8, empty)


def test_check_trainable_without_labels(tmp_path):
    from napari_ssl_seg.store import Project

    project = Project.create(tmp_path / "p.zarr", np.ones(SHAPE, np.uint16))
    session = ann.AnnotationSession(project)
    with pytest.raises(InvalidInputError, match="no annotated slice yet"):
        session.check_trainable()
    with pytest.raises(RuntimeError, match="no writer thread"):
        session.flush_async()


# ---------------------------------------------------------------- projects
def test_default_project_path(tmp_path, tiny_project):
    project, _, _ = tiny_project
    assert ann.default_project_path(tmp_path / "cells.tif") == tmp_path / "cells.ssl.zarr"
    assert ann.default_project_path(tmp_path / "a.nii.gz") == tmp_path / "a.ssl.zarr"
    assert ann.default_project_path(tmp_path / "b.ome.zarr") == tmp_path / "b.ssl.zarr"
    assert ann.default_project_path(project.path) == project.path  # a project is its own
    assert (
        ann.default_project_path(name="my layer/1", directory=tmp_path)
        == tmp_path / "my_layer_1.ssl.zarr"
    )
    with pytest.raises(ValueError, match="the volume has no file: pass directory="):
        ann.default_project_path(None, name="x")


def test_open_or_create_and_import(tmp_path):
    image = np.random.default_rng(0).integers(0, 100, SHAPE).astype(np.uint16)
    labels = np.zeros(SHAPE, np.uint8)
    labels[2, 3:6, 3:6] = 1
    project, created = ann.open_or_create(tmp_path / "p.ssl.zarr", image, voxel_size=(2, 1, 1))
    assert created and project.voxel_size == (2.0, 1.0, 1.0)
    assert ann.import_annotations(project, labels) == [2]
    assert ann.import_annotations(project, labels) == []  # already annotated
    again, created = ann.open_or_create(tmp_path / "p.ssl.zarr", image)
    assert not created and again.annotated_slices() == [2]
    with pytest.raises(SignatureMismatchError, match="belongs to another image"):
        ann.open_or_create(tmp_path / "p.ssl.zarr", image + 1)
    assert ann.import_annotations(project, labels, slices=[2, 0, 5]) == [0, 5]  # empty ones
    assert project.annotated_slices() == [0, 2, 5] and not project.annotations[5].any()
    with pytest.raises(InvalidInputError, match="does not match the image shape"):
        ann.import_annotations(project, labels[:3])
    with pytest.raises(InvalidInputError, match=r"slices \[9\] are outside 0\.\.7"):
        ann.import_annotations(project, labels, slices=[9])


def test_open_project_state(tmp_path, tiny_config):
    from napari_ssl_seg.engine import run_round

    image = np.random.default_rng(0).integers(0, 100, SHAPE).astype(np.uint16)
    labels = np.zeros(SHAPE, np.uint8)
    labels[2, 3:6, 3:6] = 1
    path = tmp_path / "p.ssl.zarr"
    first = ann.open_project_state(path, image, labels=labels, slices=[0, 2])
    try:
        assert first.created and first.imported == [0, 2] and first.merged is None
        np.testing.assert_array_equal(first.annotations, labels)
        assert first.session.annotated == {0, 2}
        run_round(first.project, tiny_config())
    finally:
        first.session.close()
    again = ann.open_project_state(path, image, labels=labels)
    try:
        assert not again.created and again.imported == []  # nothing new to import
        np.testing.assert_array_equal(again.merged, again.project.merged_labels(1))
        np.testing.assert_array_equal(again.merged[2], labels[2])  # human labels on top
    finally:
        again.session.close()
    with pytest.raises(SignatureMismatchError):
        ann.open_project_state(path, image + 1)


# ---------------------------------------------------------------- settings
def test_settings_round_trip(tmp_path):
    assert ann.load_settings(tmp_path) == ann.default_settings()  # nothing saved yet
    settings = {
        **ann.default_settings(),
        "method": "supervised",
        "preset": "thorough",
        "device": "cpu",
        "overrides": {"iterations": 5, "patch_size": 32},
    }
    path = ann.save_settings(tmp_path, settings)
    assert path == tmp_path / "ssl_seg" / "widget.json"
    assert ann.load_settings(tmp_path) == settings
    config = ann.build_config(settings)
    assert (config.method, config.iterations, config.device, config.patch_size) == (
        "supervised",
        5,
        "cpu",
        32,
    )
    assert ann.build_config(ann.default_settings()).iterations == PRESETS["quick"]
    assert PRESETS["quick"] == TrainConfig().iterations  # the widget's default = the CLI's
    assert ann.build_config(ann.default_settings()).method == TrainConfig().method


def test_bad_settings(tmp_path):
    path = tmp_path / "ssl_seg" / "widget.json"
    path.parent.mkdir()
    path.write_text(
        json.dumps(
            {
                "preset": "huge",
                "device": "tpu",
                "method": "cps",
                "overrides": {"nope": 1},
                "extra": 1,
            }
        )
    )
    assert ann.load_settings(tmp_path) == {**ann.default_settings(), "method": "cps"}
    path.write_text("{not json")
    assert ann.load_settings(tmp_path) == ann.default_settings()
    with pytest.raises(ValueError, match="unknown setting 'colour'"):
        ann.save_settings(tmp_path, {"colour": "red"})
    with pytest.raises(ValueError, match="setting 'preset' cannot be 'huge'"):
        ann.save_settings(tmp_path, {"preset": "huge"})


# ------------------------------------------------------------------ export
def test_export_labels(tiny_project, tiny_config, tmp_path):
    from napari_ssl_seg.engine import run_round

    project, _, labels = tiny_project
    with pytest.raises(InvalidInputError, match="no round to export yet"):
        ann.export_labels(project, tmp_path / "x.tif", merged=False)
    human = ann.export_labels(project, tmp_path / "human.tif")
    np.testing.assert_array_equal(read_volume(human).data[1], labels[1])
    run_round(project, tiny_config())
    merged = read_volume(ann.export_labels(project, tmp_path / "m.nii.gz"))
    np.testing.assert_array_equal(merged.data, project.merged_labels())
    assert merged.voxel_size == pytest.approx((2.0, 0.5, 0.5))
    model = read_volume(ann.export_labels(project, tmp_path / "r1.tif", round=1, merged=False))
    np.testing.assert_array_equal(model.data, project.pseudo_labels(1)[...])


def test_export_labels_never_replaces_unasked(tmp_path):
    import tifffile
    from conftest import disks_volume

    from napari_ssl_seg.errors import PathExistsError
    from napari_ssl_seg.store import Project

    image, labels = disks_volume()
    source = tmp_path / "cells.tif"
    tifffile.imwrite(source, image)
    project = Project.create(tmp_path / "p.zarr", image, source=str(source))
    project.annotate_slices(labels, [4])
    out = tmp_path / "out.tif"
    out.write_bytes(b"an older export")
    with pytest.raises(PathExistsError, match=r"out\.tif already exists; pass overwrite=True"):
        ann.export_labels(project, out)
    assert out.read_bytes() == b"an older export"
    written = ann.export_labels(project, out, overwrite=True)
    np.testing.assert_array_equal(read_volume(written).data, project.merged_labels())
    for target in (source, project.path / "x.tif", project.path):
        with pytest.raises(InvalidInputError, match="refusing to write there"):
            ann.export_labels(project, target, overwrite=True)
    np.testing.assert_array_equal(tifffile.imread(source), image)


def test_format_slices():
    assert ann.format_slices([9, 3, 4, 5]) == "3-5, 9"
    assert ann.format_slices([]) == ""
    assert ann.format_slices(range(0, 40, 2), limit=3) == "0, 2, 4, …"


def test_round_labels_async_refreshes_final_in_the_writer(tmp_path):
    from napari_ssl_seg.annotation import AnnotationSession
    from napari_ssl_seg.store import Project

    image = np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8)
    project = Project.create(tmp_path / "p.zarr", image)
    writer = project.begin_round()
    writer.write(..., np.ones(image.shape, np.uint16), np.ones(image.shape, np.float32))
    writer.commit({"method": "test"}, b"")
    labels = np.zeros(image.shape, np.uint8)
    project.annotate_slices(labels, [2])  # a human says slice 2 is all background
    session = AnnotationSession(project, background=True)
    try:
        merged = session.round_labels_async(1).result(timeout=30)
    finally:
        session.close()
    assert merged[2].max() == 0 and merged[[0, 1, 3]].min() == 1
    np.testing.assert_array_equal(project.final[...], merged)
