"""The edit rule, through the store's API: for each voxel the latest human act wins, a model
never outranks it, unmarking forgets exactly the human labels, reverting restores what was."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ssl_seg.annotation import AnnotationSession
from napari_ssl_seg.errors import InvalidInputError
from napari_ssl_seg.labels import HumanState, apply_human_edit
from napari_ssl_seg.store import Project

SHAPE = (6, 16, 16)


@pytest.fixture
def project(tmp_path):
    image = np.random.default_rng(0).integers(0, 1000, SHAPE).astype(np.uint16)
    return Project.create(tmp_path / "p.zarr", image)


def commit_round(project, value=1):
    """A round whose model says ``value`` on the left half of every slice."""
    writer = project.begin_round()
    pseudo = np.zeros(SHAPE, np.uint16)
    pseudo[:, :, :8] = value
    writer.write(..., pseudo, np.full(SHAPE, 0.9, np.float32))
    writer.commit({"method": "test"}, b"weights")
    return pseudo


BOX = (slice(3, 4), slice(2, 6), slice(2, 6))  # 16 voxels on slice 3, inside the model's 1s


def test_a_stroke_after_accept_wins(project):
    pseudo = commit_round(project)
    project.correct_slices(pseudo, [3], round=1)  # "Accept slice": verified as shown
    project.apply_edit("annotation", BOX, np.full((1, 4, 4), 2, np.uint16), whole_slices=True)
    merged = project.merged_labels()
    assert (merged[BOX] == 2).all()
    np.testing.assert_array_equal(merged[3, 8:], pseudo[3, 8:])  # the rest: as accepted
    labels, known = project.human_labels()
    assert (labels[BOX] == 2).all() and known[3].all()
    assert (project.final[BOX] == 2).all()


def test_a_correction_after_a_stroke_wins_and_then_a_stroke_again(project):
    commit_round(project)
    project.apply_edit("annotation", BOX, np.full((1, 4, 4), 2, np.uint16), whole_slices=True)
    project.apply_edit("correction", BOX, np.full((1, 4, 4), 3, np.uint16), round=1)
    assert (project.merged_labels()[BOX] == 3).all()
    project.apply_edit("annotation", BOX, np.full((1, 4, 4), 4, np.uint16), whole_slices=True)
    assert (project.merged_labels()[BOX] == 4).all()
    assert (project.human_labels()[0][BOX] == 4).all()


def test_unmark_forgets_what_accept_recorded(project):
    pseudo = commit_round(project)
    project.correct_slices(np.zeros(SHAPE, np.uint16), [3], round=1)  # accepted as empty
    assert (project.merged_labels()[3] == 0).all()
    project.apply_edit("unannotation", project._slice_region(3))
    assert project.corrected_slices() == [] and project.annotated_slices() == []
    np.testing.assert_array_equal(project.merged_labels()[3], pseudo[3])


def test_revert_of_a_stroke_leaves_an_unannotated_slice_unannotated(project):
    pseudo = commit_round(project)
    edit = project.apply_edit(
        "annotation", BOX, np.full((1, 4, 4), 2, np.uint16), whole_slices=True
    )
    assert project.annotated_slices() == [3]
    revert = project.revert_edits([edit.id], source="widget")
    assert revert.kind == "revert" and revert.source == "widget"
    assert project.annotated_slices() == []
    np.testing.assert_array_equal(project.merged_labels(), pseudo)
    np.testing.assert_array_equal(project.final[3], pseudo[3])
    assert [e.kind for e in project.edits()] == ["annotation", "revert"]


def test_revert_brings_back_the_correction_a_stroke_replaced(project):
    commit_round(project)
    project.apply_edit("correction", BOX, np.full((1, 4, 4), 3, np.uint16), round=1)
    stroke = project.apply_edit(
        "annotation", BOX, np.full((1, 4, 4), 2, np.uint16), whole_slices=False
    )
    project.revert_edits([stroke.id])
    assert (project.merged_labels()[BOX] == 3).all()
    assert (project.corrected[BOX] == 1).all() and not project.annotated[BOX].any()


def test_revert_on_an_annotated_slice_keeps_it_annotated(project):
    labels = np.zeros(SHAPE, np.uint16)
    labels[3, 8:12, 8:12] = 1
    project.annotate_slices(labels, [3])
    stroke = project.apply_edit(
        "annotation", BOX, np.full((1, 4, 4), 2, np.uint16), whole_slices=True
    )
    project.revert_edits([stroke.id])
    assert project.annotated[3].all()
    np.testing.assert_array_equal(project.annotations[3], labels[3])


def test_reverts_are_replayed_after_a_crash(project):
    commit_round(project)
    stroke = project.apply_edit(
        "annotation", BOX, np.full((1, 4, 4), 2, np.uint16), whole_slices=True
    )
    revert = project.revert_edits([stroke.id])
    # As if killed after logging the revert but before applying it: the arrays still
    # hold the stroke, the log holds the revert without its marker.
    project._edit_path(revert.id, ".done").unlink()
    project.annotated[3] = 1
    again = Project.open(project.path)
    assert again.annotated_slices() == []


def test_revert_needs_logged_edits(project):
    with pytest.raises(InvalidInputError, match=r"must be logged edits, got \[7\]"):
        project.revert_edits([7])
    with pytest.raises(InvalidInputError, match="must be logged edits"):
        project.revert_edits([])


def test_marking_a_slice_keeps_the_human_labels_on_it(project):
    """Mark slice as background: the rest of the slice, never what a human said there."""
    commit_round(project)
    project.apply_edit("correction", BOX, np.full((1, 4, 4), 3, np.uint16), round=1)
    session = AnnotationSession(project)
    session.mark_annotated(3, np.zeros(SHAPE, np.uint16))
    merged = project.merged_labels()
    assert (merged[BOX] == 3).all()
    assert (merged[3][~_box_mask(BOX)[3]] == 0).all()


def _box_mask(box):
    mask = np.zeros(SHAPE, bool)
    mask[box] = True
    return mask


def test_apply_human_edit_rule_by_hand():
    z = np.zeros((1, 2, 3), np.uint16)
    state = HumanState(z.copy(), z.astype(np.uint8), z.copy(), z.copy())
    one = np.zeros((1, 2, 3), bool)
    one[0, 0, 0] = True
    corrected = apply_human_edit(state, "correction", np.full(z.shape, 5, np.uint16), one, round=2)
    assert corrected.corrected[0, 0, 0] == 2 and corrected.corrections[0, 0, 0] == 5
    painted = apply_human_edit(
        corrected, "annotation", np.full(z.shape, 1, np.uint16), one, whole_slices_axis=1
    )
    # The painted voxel: annotation, correction mark cleared; its row (axis 1 = 0) is
    # annotated background; the other row untouched.
    assert painted.annotated[0, 0].tolist() == [1, 1, 1]
    assert painted.annotated[0, 1].tolist() == [0, 0, 0]
    assert painted.corrected[0, 0, 0] == 0 and painted.annotations[0, 0, 0] == 1
    assert state.annotated.sum() == 0  # the input is not changed
    forgotten = apply_human_edit(painted, "unannotation", None, np.ones(z.shape, bool))
    assert not any(a.any() for a in forgotten)


# ------------------------------------------------- the session: strokes and undo
def _stroke(layer, box, value):
    """Paint ``value`` into ``layer[box]`` as napari's data_setitem records it."""
    zz, yy, xx = np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij")
    index = (zz.ravel(), yy.ravel(), xx.ravel())
    old = layer[index].copy()
    layer[index] = value
    return [(index, old, value)]


def _undo(layer, item):
    for index, old, _ in reversed(item):
        layer[index] = old


@pytest.mark.parametrize("flushed", [True, False])
def test_session_undo_of_a_stroke_leaves_the_slice_unannotated(project, flushed):
    pseudo = commit_round(project)
    session = AnnotationSession(project, background=True)
    layer = np.zeros(SHAPE, np.uint16)
    item = _stroke(layer, BOX, 2)
    session.add_stroke("annotation", item)
    if flushed:
        session.flush(layer)
        assert project.annotated_slices() == [3] and session.annotated == {3}
    _undo(layer, item)
    session.add_undo("annotation", item)
    saved = session.flush(layer, merged_round=1)
    assert project.annotated_slices() == [] and session.annotated == frozenset()
    np.testing.assert_array_equal(project.merged_labels(), pseudo)
    kinds = [e.kind for e in project.edits()]
    assert kinds == (["annotation", "revert"] if flushed else [])
    if flushed:  # the merged layer is told what slice 3 shows now
        ((region, merged),) = saved.merged
        np.testing.assert_array_equal(merged, pseudo[region])
    # Redo: the same item painted again annotates the slice again.
    layer[BOX] = 2
    session.add_stroke("annotation", item)
    session.flush(layer)
    assert project.annotated_slices() == [3] and (project.merged_labels()[BOX] == 2).all()
    session.close()


def test_session_undo_of_a_correction_brings_back_the_stroke_below(project):
    commit_round(project)
    session = AnnotationSession(project)
    annotation_layer = np.zeros(SHAPE, np.uint16)
    session.add_stroke("annotation", _stroke(annotation_layer, BOX, 2))
    session.flush(annotation_layer)
    merged_layer = project.merged_labels()
    item = _stroke(merged_layer, BOX, 3)
    session.add_stroke("correction", item)
    session.flush(annotation_layer, merged_layer, round=1)
    assert (project.merged_labels()[BOX] == 3).all() and session.corrected == {3}
    _undo(merged_layer, item)
    session.add_undo("correction", item)
    session.flush(annotation_layer, merged_layer, round=1)
    assert (project.merged_labels()[BOX] == 2).all() and session.corrected == frozenset()


@pytest.mark.parametrize("order", [("annotation", "correction"), ("correction", "annotation")])
def test_session_writes_both_layers_in_the_order_painted(project, order):
    commit_round(project)
    session = AnnotationSession(project)
    layers = {"annotation": np.zeros(SHAPE, np.uint16), "correction": project.merged_labels()}
    values = {"annotation": 2, "correction": 3}
    for kind in order:
        session.add_stroke(kind, _stroke(layers[kind], BOX, values[kind]))
    session.flush(layers["annotation"], layers["correction"], round=1)
    assert (project.merged_labels()[BOX] == values[order[-1]]).all()
