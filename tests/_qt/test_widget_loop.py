"""The annotation loop in a real napari viewer: annotate, train, correct, retrain, export,
reopen; plus error messages, closing during training and the GUI's responsiveness."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tifffile

from napari_ssl_seg import io
from napari_ssl_seg._sample_data import load_nuclei
from napari_ssl_seg._widget import SslSegWidget
from napari_ssl_seg.config import TrainConfig
from napari_ssl_seg.store import Project

pytestmark = pytest.mark.gui

VOXEL = (0.29, 0.26, 0.26)
TINY = dict(
    iterations=6,
    features=[8, 16, 16, 32, 32, 8],
    patch_size=32,
    labelled_batch=1,
    unlabelled_batch=1,
    threads=1,
)
ROUND_TIMEOUT_MS = 120_000
ANNOTATED = (2, 8)


@pytest.fixture(scope="module")
def crop():
    image, truth, _ = load_nuclei()
    return image[24:36, :64, :64].copy(), truth[24:36, :64, :64].copy()


@pytest.fixture
def tif(tmp_path, crop):
    path = tmp_path / "nuclei.tif"
    tifffile.imwrite(
        path,
        crop[0],
        imagej=True,
        resolution=(1 / VOXEL[1], 1 / VOXEL[2]),
        metadata={"spacing": VOXEL[0], "unit": "um", "axes": "ZYX"},
    )
    return path


def open_widget(viewer, tif=None):
    if tif is not None:
        viewer.open(tif, plugin="napari-ssl-seg")
    widget = SslSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="SSL Seg")
    return widget


def paint_slice(layer, truth, z):
    """Paint the truth of slice ``z`` with data_setitem (what a brush records)."""
    yy, xx = np.nonzero(truth[z])
    layer.data_setitem((np.full(yy.size, z), yy, xx), 1)


def wait_for_round(qtbot, widget, r):
    qtbot.waitUntil(lambda: widget.job is None and widget.round == r, timeout=ROUND_TIMEOUT_MS)


def test_annotation_loop(make_napari_viewer, qtbot, tmp_path, tif, crop):
    _, truth = crop
    viewer = make_napari_viewer()
    widget = open_widget(viewer, tif)
    assert widget.open_project(wait=True)
    project = widget.project
    assert project.path == tmp_path / "nuclei.ssl.zarr"
    assert project.voxel_size == pytest.approx(VOXEL)
    annotations = viewer.layers["annotations"]
    assert widget.annotation_layer is annotations and annotations.data.shape == truth.shape

    # 1. Paint two slices; the autosave writes them (whole slices annotated).
    for z in ANNOTATED:
        paint_slice(annotations, truth, z)
    qtbot.waitUntil(lambda: widget.is_saved, timeout=5000)
    assert project.annotated_slices() == list(ANNOTATED)
    np.testing.assert_array_equal(project.annotations[2], truth[2])
    assert "Annotated slices (2): 2, 8" in widget.annotated_label.text()

    # 2. Mark an empty slice as annotated background, unmark it, mark it again.
    widget.go_to_slice(0)
    assert widget.current_slice() == 0
    widget.toggle_slice_mark()
    assert project.annotated_slices() == [0, 2, 8]
    assert widget.mark_button.text() == "Unmark slice"
    widget.toggle_slice_mark()
    assert project.annotated_slices() == [2, 8]
    widget.toggle_slice_mark()

    # 3. Train round 1 in the child process.
    widget.set_overrides(**TINY)
    assert widget.train()
    assert widget.stop_button.isEnabled() and not widget.train_button.isEnabled()
    wait_for_round(qtbot, widget, 1)
    pseudo = viewer.layers["pseudo-labels · round 1"]
    assert widget.pseudo_layer is pseudo and "confidence · round 1" in viewer.layers
    np.testing.assert_array_equal(pseudo.data, project.merged_labels())
    np.testing.assert_array_equal(pseudo.data[2], truth[2])  # human labels on top
    assert widget.train_button.text() == "Retrain (round 2)"
    assert widget.uncertain_list.count() > 0 and len(widget.loss_plot.values) == TINY["iterations"]

    # 4. Correct slice 5: flip a block, and paint then undo another one.
    block = (5, slice(10, 16), slice(20, 26))
    flipped = (1 - pseudo.data[block]).astype(pseudo.data.dtype)
    zz, yy, xx = np.meshgrid([5], np.arange(10, 16), np.arange(20, 26), indexing="ij")
    pseudo.data_setitem((zz.ravel(), yy.ravel(), xx.ravel()), flipped.ravel())
    before_undo = pseudo.data[5, 40:44, 40:44].copy()
    pseudo.data_setitem(
        (np.full(16, 5), np.repeat(np.arange(40, 44), 4), np.tile(np.arange(40, 44), 4)),
        1 - before_undo.ravel(),
    )
    pseudo.undo()
    np.testing.assert_array_equal(pseudo.data[5, 40:44, 40:44], before_undo)
    qtbot.waitUntil(lambda: widget.is_saved, timeout=5000)
    np.testing.assert_array_equal(project.corrections[block], flipped)
    assert (project.corrected[block] == 1).all()  # the round they correct
    # Undone before it was saved: never recorded, so not a correction.
    assert not project.corrected[5, 40:44, 40:44].any()
    corrections = [e for e in project.edits() if e.kind == "correction"]
    assert len(corrections) == 1
    assert all(e.source == "widget" and e.round == 1 for e in corrections)
    assert [e.n_voxels for e in corrections] == [36]  # touched voxels only

    # 5. Accept slice 7 and jump to the uncertain slices.
    widget.go_to_slice(7)
    widget.accept_slice()
    assert (project.corrected[7] == 1).all() and 7 in widget.session.corrected
    first = widget.next_uncertain()
    assert widget.current_slice() == first == widget._uncertain[0]

    # 6. Retrain: the correction survives in the store and in the new layer.
    assert widget.train()
    wait_for_round(qtbot, widget, 2)
    pseudo = viewer.layers["pseudo-labels · round 2"]
    assert "pseudo-labels · round 1" not in viewer.layers
    np.testing.assert_array_equal(pseudo.data[block], flipped)
    np.testing.assert_array_equal(project.corrections[block], flipped)
    np.testing.assert_array_equal(project.final[block], flipped)
    np.testing.assert_array_equal(pseudo.data[8], truth[8])

    # 7. Export, read back.
    written = widget.export(tmp_path / "out.tif")
    volume = io.read_volume(written)
    np.testing.assert_array_equal(volume.data, project.merged_labels())
    assert volume.voxel_size == pytest.approx(VOXEL)
    widget.method_combo.setCurrentText("supervised")
    widget.close()

    # 8. Reopen the project in a new viewer: everything is back.
    viewer2 = make_napari_viewer()
    viewer2.open(project.path, plugin="napari-ssl-seg")
    widget2 = open_widget(viewer2)  # picks the project up by itself
    qtbot.waitUntil(lambda: widget2.project is not None and widget2._opening is None)
    assert widget2.project is not None and widget2.project.path == project.path
    assert widget2.session.annotated == {0, 2, 8} and {5, 7} <= widget2.session.corrected
    assert widget2.round == 2 and widget2.pseudo_layer.name == "pseudo-labels · round 2"
    np.testing.assert_array_equal(widget2.pseudo_layer.data, project.merged_labels())
    np.testing.assert_array_equal(widget2.annotation_layer.data[2], truth[2])
    assert widget2.settings["overrides"] == TINY
    assert widget2.method_combo.currentText() == "supervised"
    assert widget2.train_button.text() == "Retrain (round 3)"
    assert [n for n in viewer2.layers if n.name.startswith("pseudo")] == [widget2.pseudo_layer]
    widget2.close()


def test_open_project_runs_in_a_worker(make_napari_viewer, qtbot, tmp_path, tif, monkeypatch):
    """Creating a project copies the image: the store work must leave the GUI thread."""
    import threading

    from napari_ssl_seg import annotation as ann

    threads = []
    real_open_or_create = ann.open_or_create

    def recording(*args, **kwargs):  # the real function, with the thread it ran in noted
        threads.append(threading.current_thread())
        return real_open_or_create(*args, **kwargs)

    monkeypatch.setattr(ann, "open_or_create", recording)
    viewer = make_napari_viewer()
    widget = open_widget(viewer, tif)
    assert widget.open_project()  # returns at once, before the store work is done
    assert not widget.open_button.isEnabled() and not widget.train_button.isEnabled()
    assert not widget.open_project() and "being opened" in widget.status_label.text()
    qtbot.waitUntil(lambda: widget.project is not None and widget._opening is None)
    assert threads and threads[0] is not threading.main_thread()
    assert widget.open_button.isEnabled() and "Created" in widget.status_label.text()
    assert widget.annotation_layer is viewer.layers["annotations"]

    # A failure in the worker is shown, and the widget is usable again.
    (tmp_path / "not-a-project.zarr").mkdir()
    widget.path_edit.setText(str(tmp_path / "not-a-project.zarr"))
    assert not widget.open_project(wait=True)
    assert "Cannot open the project" in widget.status_label.text()
    assert widget.project is None and widget.open_button.isEnabled()
    widget.close()


def test_new_project_along_another_axis(make_napari_viewer, qtbot, tmp_path, tif, crop):
    """A project sliced along Y: the slider moves along Y, strokes annotate Y slices, and
    reopening keeps the project's axis whatever the form says."""
    _, truth = crop
    y = int(np.flatnonzero(truth.any(axis=(0, 2)))[10])  # a Y plane that cuts nuclei
    viewer = make_napari_viewer()
    widget = open_widget(viewer, tif)
    widget.axis_combo.setCurrentIndex(1)
    assert widget.open_project(wait=True)
    project = widget.project
    assert project.axis == 1 and project.n_slices == truth.shape[1]
    assert viewer.dims.order[0] == 1 and tuple(viewer.dims.displayed) == (0, 2)
    assert "slices along axis 1" in widget.project_label.text()
    widget.go_to_slice(y)
    assert widget.current_slice() == y

    zz, xx = np.nonzero(truth[:, y, :])
    widget.annotation_layer.data_setitem((zz, np.full(zz.size, y), xx), 1)
    qtbot.waitUntil(lambda: widget.is_saved, timeout=5000)
    assert project.annotated_slices() == [y]
    np.testing.assert_array_equal(project.annotations[:, y, :], truth[:, y, :])
    widget.go_to_slice(3)  # no nucleus there: marked as annotated background
    widget.toggle_slice_mark()
    assert project.annotated_slices() == [3, y]
    path = project.path
    widget.close()

    viewer.dims.order = (0, 1, 2)
    again = open_widget(viewer)
    again.axis_combo.setCurrentIndex(2)
    again.path_edit.setText(str(path))
    assert again.open_project(wait=True)
    assert again.project.axis == 1 and again.axis_combo.currentIndex() == 1
    assert viewer.dims.order[0] == 1 and again.project.annotated_slices() == [3, y]
    again.close()


def test_messages(make_napari_viewer, qtbot, tmp_path, tif, crop):
    viewer = make_napari_viewer()
    viewer.open(tif, plugin="napari-ssl-seg")
    # As the Plugins menu does it, through the manifest.
    _, widget = viewer.window.add_plugin_dock_widget(
        "napari-ssl-seg", "SSL Seg: annotate and train"
    )
    assert isinstance(widget, SslSegWidget) and widget.viewer.layers[0].name == "nuclei"
    assert not widget.train() and "Open a project first" in widget.status_label.text()
    viewer.add_labels(np.zeros((3, 8, 8), np.uint8), name="wrong")
    widget.labels_combo.setCurrentText("wrong")
    assert not widget.open_project(wait=True)
    assert "has shape (3, 8, 8), but the image 'nuclei' has (12, 64, 64)" in (
        widget.status_label.text()
    )
    widget.labels_combo.setCurrentText("(new layer)")
    assert widget.open_project(wait=True)
    assert not widget.train() and "no annotated slice yet" in widget.status_label.text()
    assert widget.train_button.isEnabled()

    # A failing round: the error is shown and the widget is usable again.
    paint_slice(widget.annotation_layer, crop[1], 4)
    qtbot.waitUntil(lambda: widget.method_combo.count() > 1, timeout=60_000)  # registry loaded
    assert widget.method_combo.currentText() == TrainConfig().method
    widget.settings["method"] = "no-such-method"
    assert widget.train()  # started once the stroke is saved
    qtbot.waitUntil(
        lambda: widget.job is None and "Training failed" in widget.status_label.text(),
        timeout=ROUND_TIMEOUT_MS,
    )
    assert "Training failed: ValueError: unknown method 'no-such-method'" in (
        widget.status_label.text()
    )
    assert widget.train_button.isEnabled() and widget.project.latest_round == 0
    assert widget.project.annotated_slices() == [4]  # flushed before training

    # The shortcuts are bound on the viewer while the widget lives.
    from napari.utils.key_bindings import KeyBinding

    keys = [KeyBinding.from_str(k) for k in ("N", "A", "Shift-T")]
    assert all(k in viewer.keymap for k in keys)
    viewer.keymap[keys[0]](viewer)
    assert "No uncertain slices yet" in widget.status_label.text()
    widget.close()
    assert not any(k in viewer.keymap for k in keys)


def test_close_during_training_stops_the_child(make_napari_viewer, qtbot, tif, crop):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, tif)
    widget.open_project(wait=True)
    paint_slice(widget.annotation_layer, crop[1], 4)
    widget.set_overrides(**{**TINY, "iterations": 100_000})
    assert widget.train()
    qtbot.waitUntil(lambda: widget.job is not None, timeout=10_000)  # once saved
    job, path = widget.job, widget.project.path
    qtbot.waitUntil(lambda: widget._phase == "train", timeout=ROUND_TIMEOUT_MS)
    started = time.monotonic()
    viewer.close()  # what closing the napari window does
    qtbot.waitUntil(lambda: not job.is_running, timeout=15_000)
    took = time.monotonic() - started
    print(f"\nclosing during training: the child ended {took:.1f} s after close")
    assert job.stop_requested and took < 10
    # Stopped (not killed) in time: the round it had trained is committed.
    record = Project.open(path).round_record(1)
    assert record["stopped_early"] and record["iterations_done"] < 100_000
    assert record["method"] == "mean-teacher"  # "auto" from one painted slice


def test_gui_stays_responsive_while_training(make_napari_viewer, qtbot, tif, crop):
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer()
    widget = open_widget(viewer, tif)
    widget.open_project(wait=True)
    for z in ANNOTATED:
        paint_slice(widget.annotation_layer, crop[1], z)
    widget.set_overrides(**{**TINY, "iterations": 100_000})
    assert widget.train()
    qtbot.waitUntil(lambda: widget._phase == "train", timeout=ROUND_TIMEOUT_MS)

    period_ms, lateness, last = 20, [], [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        lateness.append(max(0.0, (now - last[0]) * 1000 - period_ms))
        last[0] = now

    steps = [0]

    def scroll_and_paint():  # what an annotator does meanwhile
        steps[0] += 1
        viewer.dims.set_current_step(0, steps[0] % 12)
        widget.pseudo_layer or widget.annotation_layer.data_setitem(
            (np.array([steps[0] % 12]), np.array([1]), np.array([steps[0] % 64])), 2
        )

    clock, user = QTimer(interval=period_ms), QTimer(interval=150)
    clock.timeout.connect(tick)
    user.timeout.connect(scroll_and_paint)
    clock.start()
    user.start()
    qtbot.wait(8000)
    clock.stop()
    user.stop()
    iterations = len(widget.loss_plot.values)
    widget.stop()
    qtbot.waitUntil(lambda: widget.job is None, timeout=ROUND_TIMEOUT_MS)
    late = np.asarray(lateness[1:])
    print(
        f"\nevent-loop lateness over {late.size} ticks of {period_ms} ms while training "
        f"({iterations} iterations, {steps[0]} scroll+paint steps): mean {late.mean():.1f} ms, "
        f"p95 {np.percentile(late, 95):.1f} ms, max {late.max():.1f} ms"
    )
    assert iterations > 0 and widget.project.latest_round == 1
    assert late.max() < 250, f"the GUI froze for {late.max():.0f} ms"
    widget.close()


def test_export_replaces_a_file_only_after_the_save_dialog(
    make_napari_viewer, qtbot, tmp_path, tif, monkeypatch
):
    from napari_ssl_seg import _widget

    viewer = make_napari_viewer()
    widget = open_widget(viewer, tif)
    assert widget.open_project(wait=True)
    out = tmp_path / "out.tif"
    out.write_bytes(b"an older export")
    assert widget.export(out) is None  # a script's call: nobody asked
    assert "already exists" in widget.status_label.text()
    assert out.read_bytes() == b"an older export"

    # The save dialog asks "replace?" itself before it returns an existing name.
    chosen = []
    monkeypatch.setattr(
        _widget.QFileDialog, "getSaveFileName", lambda *a, **k: (str(chosen[-1]), "")
    )
    chosen.append(out)
    widget.export_button.click()
    np.testing.assert_array_equal(io.read_volume(out).data, widget.project.merged_labels())
    source = tif.read_bytes()
    chosen.append(tif)  # even confirmed, the source image is never written over
    widget.export_button.click()
    assert "source image" in widget.status_label.text()
    assert tif.read_bytes() == source
    widget.close()
