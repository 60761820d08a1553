"""Human work in a real napari window is never lost nor outranked: the widget's real buttons
(``QPushButton.click``) and real brush strokes (``Labels.paint``), the project on disk."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tifffile

from napari_ssl_seg import io
from napari_ssl_seg._sample_data import load_nuclei
from napari_ssl_seg._widget import SslSegWidget
from napari_ssl_seg.config import TrainConfig
from napari_ssl_seg.engine import run_round
from napari_ssl_seg.store import Project

pytestmark = pytest.mark.gui

TINY = dict(
    iterations=6,
    features=[8, 16, 16, 32, 32, 8],
    patch_size=32,
    labelled_batch=1,
    unlabelled_batch=1,
    threads=1,
    method="supervised",
)
ROUND_TIMEOUT_MS = 120_000
SAVE_TIMEOUT_MS = 10_000


@pytest.fixture(scope="module")
def crop():
    image, truth, _ = load_nuclei()
    return image[24:36, :64, :64].copy(), truth[24:36, :64, :64].copy()


@pytest.fixture
def trained(tmp_path, crop):
    """A tif and its project with slices 2 and 8 annotated and one trained round."""
    image, truth = crop
    tif = tmp_path / "nuclei.tif"
    tifffile.imwrite(tif, image)
    project = Project.create(tmp_path / "nuclei.ssl.zarr", image, source=str(tif))
    project.annotate_slices(truth, [2, 8], source="test")
    run_round(project, TrainConfig(**TINY))
    project.refresh_final()
    return tif, project


def open_widget(viewer, qtbot, tif):
    viewer.open(tif, plugin="napari-ssl-seg")
    widget = SslSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="SSL Seg")
    assert widget.open_project(wait=True)
    qtbot.waitUntil(lambda: widget.round == 1, timeout=SAVE_TIMEOUT_MS)
    widget.set_overrides(**TINY)
    return widget


def brush(layer, z, y, x, label, size=5):
    """One brush dab on slice ``z`` of ``layer`` as the mouse makes it; returns its mask."""
    before = layer.data.copy()
    layer.brush_size = size
    layer.paint((z, y, x), label)
    changed = layer.data != before
    assert changed.any() and changed[z].sum() == changed.sum()
    return changed


def saved(qtbot, widget):
    qtbot.waitUntil(lambda: widget.is_saved, timeout=SAVE_TIMEOUT_MS)


def test_a_stroke_after_accept_wins_in_the_export(make_napari_viewer, qtbot, tmp_path, trained):
    tif, _ = trained
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, tif)
    widget.go_to_slice(5)
    widget.accept_button.click()
    assert 5 in widget.session.corrected
    annotations = widget.annotation_layer
    stroke = brush(annotations, 5, 30, 30, 2)
    saved(qtbot, widget)
    written = io.read_volume(widget.export(tmp_path / "out.tif")).data
    assert (written[stroke] == 2).all()
    np.testing.assert_array_equal(widget.project.final[...][stroke], 2)
    labels, known = widget.project.human_labels()
    assert (labels[stroke] == 2).all() and known[5].all()
    # Unmark forgets what Accept recorded, and the stroke: slice 5 shows the model again.
    assert widget.mark_button.text() == "Unmark slice"
    widget.mark_button.click()
    assert 5 not in widget.session.corrected | widget.session.annotated
    np.testing.assert_array_equal(widget.pseudo_layer.data[5], widget.project.pseudo_labels(1)[5])
    widget.close()


@pytest.mark.parametrize("wait_for_save", [True, False])
def test_an_undone_stroke_leaves_the_slice_unannotated(
    make_napari_viewer, qtbot, tmp_path, trained, wait_for_save
):
    tif, project = trained
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, tif)
    widget.go_to_slice(10)
    brush(widget.annotation_layer, 10, 30, 30, 1)
    if wait_for_save:
        saved(qtbot, widget)
        assert 10 in widget.session.annotated
    widget.annotation_layer.undo()  # what Ctrl-Z calls
    saved(qtbot, widget)
    assert 10 not in widget.session.annotated
    assert project.annotated_slices() == [2, 8]
    pseudo = np.asarray(project.pseudo_labels(1)[10])
    np.testing.assert_array_equal(project.merged_labels()[10], pseudo)
    np.testing.assert_array_equal(widget.pseudo_layer.data[10], pseudo)
    written = io.read_volume(widget.export(tmp_path / "out.tif")).data
    np.testing.assert_array_equal(written[10], pseudo)
    # Redo paints it again: annotated again.
    widget.annotation_layer.redo()
    saved(qtbot, widget)
    assert project.annotated_slices() == [2, 8, 10]
    widget.close()


def test_mark_button_acts_on_the_slice_shown(make_napari_viewer, qtbot, trained):
    tif, project = trained
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, tif)
    widget.go_to_slice(2)
    painted = widget.annotation_layer.data[2].copy()
    widget.go_to_slice(10)
    assert widget.mark_button.text() == "Mark slice as background"
    widget.mark_button.click()
    assert project.annotated_slices() == [2, 8, 10]
    assert widget.mark_button.text() == "Unmark slice"
    widget.mark_button.click()
    assert project.annotated_slices() == [2, 8]
    np.testing.assert_array_equal(widget.annotation_layer.data[2], painted)
    np.testing.assert_array_equal(project.annotations[2], painted)
    widget.close()


def test_strokes_painted_while_a_round_lands_are_kept(make_napari_viewer, qtbot, trained):
    """An annotator keeps correcting round 1 while round 2 trains, lands and is shown."""
    from qtpy.QtCore import QTimer

    tif, project = trained
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, tif)
    pseudo = widget.pseudo_layer
    slices = [z for z in range(12) if z not in (2, 8)]
    spots = [(z, y, x) for y in range(4, 62, 6) for x in range(4, 62, 6) for z in slices]
    last: dict = {}  # spot -> the label painted there last
    count, limit = [0], [None]

    def paint_next():
        if widget.round == 2 and limit[0] is None:
            limit[0] = count[0] + 20  # a few more strokes on the new round
        if limit[0] is None or count[0] < limit[0]:
            spot = spots[count[0] % len(spots)]
            label = 3 + count[0] // len(spots) % 5  # classes the model never predicts here
            pseudo.brush_size = 3
            pseudo.paint(spot, label)
            last[spot] = label
            count[0] += 1

    assert widget.train_button.isEnabled()
    widget.train_button.click()
    clock = QTimer(interval=40)
    clock.timeout.connect(paint_next)
    clock.start()
    qtbot.waitUntil(lambda: widget.round == 2 and widget.job is None, timeout=ROUND_TIMEOUT_MS)
    qtbot.waitUntil(lambda: count[0] == limit[0], timeout=ROUND_TIMEOUT_MS)
    clock.stop()
    saved(qtbot, widget)
    assert widget.pseudo_layer is pseudo
    for spot, label in last.items():  # nothing painted vanished from the screen
        assert pseudo.data[spot] == label, (spot, label, pseudo.data[spot])
    merged = project.merged_labels()
    painted = pseudo.data >= 3
    np.testing.assert_array_equal(merged[painted], pseudo.data[painted])  # every stroke stored
    assert not (merged[~painted] >= 3).any()  # and nothing else
    assert (project.corrected[...][painted] > 0).all()
    widget.close()


def test_stress_painting_through_three_rounds_beside_a_cli_correct(
    make_napari_viewer, qtbot, tmp_path, trained, crop
):
    """The widget paints on both layers without pause while its child trains three rounds
    and a CLI ``correct`` writes the same project: every stroke is stored, in the order
    made, with its provenance, and the export shows it."""
    import subprocess
    import sys

    from qtpy.QtCore import QTimer

    tif, project = trained
    _, truth = crop
    cli_labels = tmp_path / "cli.tif"
    tifffile.imwrite(cli_labels, truth.astype(np.uint16))
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, tif)
    pseudo, annotations = widget.pseudo_layer, widget.annotation_layer
    corrected_slices = [4, 5, 6, 7, 9, 10]
    spots = [(z, y, x) for y in range(4, 62, 6) for x in range(4, 62, 6) for z in corrected_slices]
    order: list = []  # (layer name, spot, label) as painted
    count = [0]

    def paint_next():
        k = count[0]
        count[0] += 1
        if k % 5 == 4:  # every fifth stroke: the annotation layer, on annotated slice 2
            spot = (2, 4 + (k // 5 * 7) % 56, 4 + (k // 5 * 3) % 56)
            name, layer, label = "annotation", annotations, 2
        else:
            spot = spots[k % len(spots)]
            name, layer, label = "correction", pseudo, 3 + k // len(spots) % 5
        layer.brush_size = 1
        if layer.data[spot] != label:  # napari records no stroke that changes nothing
            order.append((name, spot, label))
        layer.paint(spot, label)

    clock = QTimer(interval=40)
    clock.timeout.connect(paint_next)
    clock.start()
    cli = None
    for r in (2, 3, 4):
        qtbot.waitUntil(lambda: widget.train_button.isEnabled(), timeout=ROUND_TIMEOUT_MS)
        widget.train_button.click()
        if r == 3:  # a second writer, while the widget paints and its child trains
            cli = subprocess.Popen(
                [sys.executable, "-m", "napari_ssl_seg.cli", "correct", str(project.path),
                 "--labels", str(cli_labels), "--slices", "0,11"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        qtbot.waitUntil(lambda r=r: widget.round == r, timeout=ROUND_TIMEOUT_MS)
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, err
    qtbot.wait(500)  # strokes on round 4 too
    clock.stop()
    saved(qtbot, widget)
    assert project.latest_round == 4 and len(order) > 100

    last = {(kind, spot): (k, label) for k, (kind, spot, label) in enumerate(order)}
    merged = project.merged_labels()
    for (kind, spot), (_, label) in last.items():
        assert merged[spot] == label, (kind, spot, label, merged[spot])
        assert (pseudo if kind == "correction" else annotations).data[spot] == label
    np.testing.assert_array_equal(merged[[0, 11]], truth[[0, 11]])  # the CLI's
    written = io.read_volume(widget.export(tmp_path / "out.tif")).data
    np.testing.assert_array_equal(written, merged)

    # Provenance and order: each spot's last stroke is in an edit of the widget's, and on
    # each slice (where strokes can meet) those edits come in the order the strokes were
    # made; strokes on different slices touch other voxels and may be written together.
    edits = project.edits()
    assert {e.source for e in edits} == {"test", "widget", "cli"}
    assert [e.kind for e in edits if e.source == "cli"] == ["correction", "correction"]

    def edit_of(kind, spot, label):
        """The last widget edit that painted ``label`` at ``spot`` (its logged mask)."""
        found = []
        for e in edits:
            if e.kind != kind or e.source != "widget":
                continue
            if not all(s.start <= c < s.stop for s, c in zip(e.region, spot, strict=True)):
                continue
            inner = tuple(c - s.start for s, c in zip(e.region, spot, strict=True))
            with np.load(project._edit_path(e.id, ".npz")) as logged:
                if logged["mask"][inner] and logged["values"][inner] == label:
                    found.append(e.id)
        return max(found)

    in_order = sorted(last.items(), key=lambda item: item[1][0])
    for z in {spot[0] for (_, spot) in last}:
        ids = [edit_of(kind, spot, label) for (kind, spot), (_, label) in in_order if spot[0] == z]
        assert ids == sorted(ids), z
    widget.close()


def test_new_layers_open_ready_to_paint(make_napari_viewer, qtbot, trained):
    tif, _ = trained
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, tif)
    for layer in (widget.annotation_layer, widget.pseudo_layer):
        assert layer.mode == "paint" and layer.selected_label >= 1
    assert viewer.layers.selection.active is widget.pseudo_layer  # the next strokes correct
    widget.close()


def test_export_proposes_a_new_name_and_says_where(
    make_napari_viewer, qtbot, trained, tmp_path, monkeypatch
):
    from qtpy.QtWidgets import QFileDialog

    tif, project = trained
    truth = tmp_path / "nuclei_labels.tif"  # what the sample ships beside its image
    tifffile.imwrite(truth, np.ones((2, 2), np.uint8))
    (tmp_path / "nuclei.ssl-labels.r1.tif").write_bytes(b"an earlier export")
    before = {p: p.read_bytes() for p in (tif, truth, tmp_path / "nuclei.ssl-labels.r1.tif")}
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, tif)
    proposed = []

    def accept_default(parent, title, default, *args, **kwargs):  # the user clicks Save
        proposed.append(default)
        return default, ""

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(accept_default))
    widget.export_button.click()
    assert proposed == [str(tmp_path / "nuclei.ssl-labels.r1-2.tif")]
    assert {p: p.read_bytes() for p in before} == before  # nothing existing replaced
    written = io.read_volume(tmp_path / "nuclei.ssl-labels.r1-2.tif").data
    np.testing.assert_array_equal(written, project.merged_labels())
    assert str(tmp_path / "nuclei.ssl-labels.r1-2.tif") in widget.status_label.text()


def test_train_queues_behind_pending_saves_without_freezing(make_napari_viewer, qtbot, trained):
    """Train clicked right after painting a dense slice: the click returns at once, the
    widget says "saving…", and the round trains on the painted slice once it is saved."""
    tif, project = trained
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, tif)
    widget.go_to_slice(10)
    layer = widget.annotation_layer
    layer.brush_size = 2
    for y in range(64):  # one history item per drag, a row of dabs each
        with layer.block_history():
            for x in range(0, 64, 2):
                layer.paint((10, y, x), 1 + y // 16 % 2, refresh=False)
    assert (layer.data[10] > 0).all() and widget.session.pending
    start = time.perf_counter()
    widget.train_button.click()
    click = time.perf_counter() - start
    # The 64 strokes are written in the writer thread, not while the click waits.
    assert click < 0.3, f"the Train click blocked the GUI for {click:.2f} s"
    assert widget.save_label.text().startswith("saving")
    qtbot.waitUntil(lambda: widget.round == 2 and widget.job is None, timeout=ROUND_TIMEOUT_MS)
    assert widget.save_label.text() == ""
    assert 10 in project.round_record(2)["human_slices"]
    np.testing.assert_array_equal(project.annotations[10], layer.data[10])
    assert (project.annotated[10] == 1).all()
    widget.close()


def test_the_widget_fits_napari_s_window_and_shows_the_next_step(
    make_napari_viewer, qtbot, trained
):
    tif, _ = trained
    viewer = make_napari_viewer(show=True)
    widget = open_widget(viewer, qtbot, tif)
    qtbot.waitUntil(lambda: widget.isVisible(), timeout=SAVE_TIMEOUT_MS)
    assert [widget.tabs.tabText(k) for k in range(widget.tabs.count())] == [
        "Project",
        "Annotate",
        "Train",
        "Review",
        "Export",
    ]
    assert widget.tabs.tabText(widget.tabs.currentIndex()) == "Review"  # a round to review
    # The round's estimate on held-out human labels, and what it wrote.
    assert "of the human voxels held out; Dice network" in widget.estimate_label.text()
    assert "wrote " in widget.estimate_label.text()
    # The status line and the progress stay in view at napari's window size.
    window = viewer.window._qt_window
    assert widget.minimumSizeHint().height() < window.height()
    for part in (widget.status_label, widget.progress_bar, widget.tabs):
        assert part.isVisible() and not part.visibleRegion().isEmpty()
    widget.close()
