"""The napari widget: annotate slices, train in the background, correct, retrain, export.

With :mod:`napari_ssl_seg._widget_parts` (its layout and Qt helpers), the only module
that imports Qt and napari. It is thin: the project and the human edits
belong to :class:`napari_ssl_seg.annotation.AnnotationSession`, training to a
:class:`napari_ssl_seg.jobs.TrainingJob` (a child process polled from a QTimer, so the
brush and the slice slider stay live), settings and export to
:mod:`napari_ssl_seg.annotation`. This module builds those objects, keeps the layers in
step with them and shows what they report.

Layers: the image, ``confidence · round N`` (magma, hidden), ``pseudo-labels · round N``
(editable: corrections, with human labels on top) and ``annotations`` (on top). Strokes
on ``annotations`` become annotation edits (whole slices), strokes on the pseudo-labels
become corrections of round N; both are written to the project at most
``AUTOSAVE_MS`` after the stroke, as the touched boxes only, by the session's writer
thread: the GUI thread never waits for it. Train, Accept, Mark and Export queue behind
the strokes still being saved ("saving…" shows meanwhile).

Shortcuts (bound on the viewer; none is a napari default for Image or Labels layers,
though a selected Points or Shapes layer keeps its own "A"): ``N`` next uncertain
slice, ``A`` accept the slice, ``Shift-T`` train / retrain.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QFileDialog,
    QListWidgetItem,
    QWidget,
)

from napari_ssl_seg import annotation as ann
from napari_ssl_seg._reader import PROJECT_KEY, is_project
from napari_ssl_seg._sample_data import ANNOTATED_SLICES_KEY
from napari_ssl_seg._widget_parts import (
    PaintRelay,
    WidgetLayout,
    register_task,
    update_task,
    watch_history,
)
from napari_ssl_seg.config import AUTO, PRESETS
from napari_ssl_seg.errors import SslSegError
from napari_ssl_seg.jobs import TrainingJob, error_summary

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

POLL_MS = 100  # how often the child's queue is read
AUTOSAVE_MS = 250  # a crash loses at most the strokes of this window
STOP_TIMEOUT_S = 5.0  # on close: wait this long for a stopped round, then kill it
SHORTCUTS = {"n": "next_uncertain", "a": "accept_slice", "Shift-T": "train"}
NEW_LAYER = "(new layer)"
PHASES = {
    "load": "loading",
    "pretrain": "pretraining",
    "train": "training",
    "validate": "validating",
    "predict": "predicting",
    "write": "writing",  # 3D mode: voting on the written output, ranking the slices
    "done": "saving",
}


class SslSegWidget(WidgetLayout, QWidget):
    """Annotate, train in the background, correct pseudo-labels, retrain, export.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    """

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        # napari hands plugin widgets a PublicOnlyProxy that wraps every object it returns
        # anew, so ``layer is self.annotation_layer`` would never hold: use the viewer.
        self.viewer = viewer = getattr(viewer, "__wrapped__", viewer)
        self.session: ann.AnnotationSession | None = None
        self.settings = ann.default_settings()
        self.image_layer = None
        self.annotation_layer = None
        self.pseudo_layer = None
        self.confidence_layer = None
        self.round = 0  # the round shown in the pseudo-label layer
        self.job: TrainingJob | None = None
        self._job_box: list[TrainingJob] = []  # shared with the destroyed-handler
        self._progress: progress | None = None
        self._phase = ""
        self._task = None  # napari task-status id of the running round
        self._uncertain: list[int] = []
        self._uncertain_pos = -1
        self._unbound: dict[str, object] = {}
        self._relays: dict[int, PaintRelay] = {}
        self._closed = False
        self._opening = None  # the thread worker opening a project, while it runs
        self._build()
        self._method_names: list = []  # filled by a thread: [names]
        threading.Thread(
            target=_load_method_names,
            args=(self._method_names,),
            daemon=True,
            name="napari-ssl-seg methods",
        ).start()
        self._names_timer = QTimer(self, interval=200)
        self._names_timer.timeout.connect(lambda: self._method_names and self._fill_methods())
        self._names_timer.start()
        self._poll_timer = QTimer(self, interval=POLL_MS)
        self._poll_timer.timeout.connect(self._poll)
        self._save_timer = QTimer(self, interval=AUTOSAVE_MS, singleShot=True)
        self._save_timer.timeout.connect(self._autosave)
        self._reap_timer = QTimer(self, interval=50)
        self._reap_timer.timeout.connect(self._reap)
        # (Future of Saved, round, correction boxes) written by the session's thread
        self._saving: list = []
        self._round_loading = False  # a round's labels are being merged for display
        self._queued: list[str] = []  # actions waiting for the strokes to be saved
        viewer.layers.events.inserted.connect(self._refresh_layer_choices)
        viewer.layers.events.removed.connect(self._refresh_layer_choices)
        viewer.layers.events.removing.connect(self._layer_removing)
        viewer.dims.events.current_step.connect(self._update_slice_info)
        self._bind_keys()
        box = self._job_box
        # Closing napari deletes the widget without a closeEvent: end the child anyway.
        self.destroyed.connect(lambda *_: [job.shutdown(STOP_TIMEOUT_S) for job in box])
        self._refresh_layer_choices()
        self._set_busy(False)
        chosen = self.image_layer_choice()
        if chosen is not None and PROJECT_KEY in chosen.metadata:
            self.open_project()  # a project opened with our reader: pick it up at once

    # ============================================================== project
    @property
    def project(self):
        return None if self.session is None else self.session.project

    def image_layer_choice(self):
        name = self.image_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def open_project(self, path: str | Path | None = None, *, wait: bool = False) -> bool:
        """Open (or create) the project of the chosen image and wire its layers.

        ``path`` defaults to the path field, then to ``<name>.ssl.zarr`` beside the
        image's file, then asks for a folder. Creating a project copies the image into
        it (seconds for a large volume), so the store work runs in a napari thread
        worker and the layers are wired when it returns; the viewer stays live.

        Parameters
        ----------
        wait : bool
            Keep processing GUI events until the project is open (scripts and tests).

        Returns
        -------
        bool
            False when the request was refused at once (the message says why); True when
            the opening started, or, with ``wait``, when the project is open.
        """
        if self.job is not None:
            return self._message("A round is running: wait for it, or Stop it first.", "warning")
        if self._opening is not None:
            return self._message("A project is being opened: wait for it.", "warning")
        image = self.image_layer_choice()
        if image is None:
            return self._message("Open a 3D image first (File ▸ Open, or a sample).", "warning")
        if image.ndim != 3 or getattr(image, "rgb", False) or image.multiscale:
            return self._message(
                f"Layer '{image.name}' has shape {image.data.shape}: "
                "need a single-scale 3D (Z, Y, X) volume.",
                "warning",
            )
        own = image.metadata.get(PROJECT_KEY)
        path = path or self.path_edit.text().strip() or own or self._default_path(image)
        if not path:
            return self._message("Choose a folder for the project (Browse…).", "warning")
        labels = self._labels_choice()
        if labels is not None and tuple(labels.data.shape) != tuple(image.data.shape):
            return self._message(
                f"Layer '{labels.name}' has shape {tuple(labels.data.shape)}, but the image "
                f"'{image.name}' has {tuple(image.data.shape)}: pick another annotation layer "
                f"or '{NEW_LAYER}'.",
                "warning",
            )
        self._close_project()
        scale = tuple(float(s) for s in image.scale)
        worker = create_worker(
            ann.open_project_state,
            path,
            image.data,
            voxel_size=None if scale == (1.0,) * 3 else scale,
            source=str(self._source_path(image) or image.name),
            check_image=own is None or Path(own) != Path(path),
            labels=None if labels is None else labels.data,
            slices=None if labels is None else labels.metadata.get(ANNOTATED_SLICES_KEY),
            axis=self.axis_combo.currentIndex(),
            _progress={"desc": "napari-ssl-seg: opening the project"},
            _ignore_errors=True,  # errored is handled: a message in the widget
        )
        outcome: list[bool] = []
        worker.returned.connect(
            lambda opened: outcome.append(self._project_ready(opened, image, labels))
        )
        worker.errored.connect(lambda err: outcome.append(self._project_failed(err)))
        self._opening = worker
        self._set_busy(False)
        self.progress_bar.setRange(0, 0)
        self.progress_bar.setFormat("opening the project…")
        self._message(f"Opening {path} (a new project copies the image first)…")
        worker.start()
        if not wait:
            return True
        while not outcome:
            QApplication.processEvents()
            time.sleep(0.005)
        return outcome[0]

    def _project_ready(self, opened: ann.OpenedProject, image, labels) -> bool:
        """Wire the layers of a project the worker opened (GUI thread)."""
        self._opening = None
        self._reset_progress_bar()
        gone = image not in self.viewer.layers or (
            labels is not None and labels not in self.viewer.layers
        )
        if self._closed or gone:
            opened.session.close()
            if self._closed:
                return False
            self._set_busy(False)
            return self._message("The image or annotation layer was closed meanwhile.", "warning")
        project = opened.project
        self.session = opened.session
        self.image_layer = image
        self.path_edit.setText(str(project.path))
        self.axis_combo.setCurrentIndex(project.axis)
        self._slide_along(project.axis)
        self.settings = ann.load_settings(project.path)
        self._apply_settings()
        self._attach_annotation_layer(labels, image, opened.annotations)
        if project.latest_round:
            self._show_round(project.latest_round, opened.merged)
        self._refresh_export_choices()
        self._set_busy(False)
        self._update_slice_info()
        self.show_step("Review" if project.latest_round else "Annotate")
        what = "Created" if opened.created else "Opened"
        extra = (
            f"; imported annotated slices {ann.format_slices(opened.imported)}"
            if opened.imported
            else ""
        )
        self.project_label.setText(
            f"{project.path.name}: {' × '.join(map(str, project.shape))}, "
            f"slices along axis {project.axis}, {project.latest_round} round(s)"
        )
        return self._message(f"{what} {project.path}{extra}.")

    def _project_failed(self, err: Exception) -> bool:
        self._opening = None
        self._reset_progress_bar()
        if self._closed:
            return False
        self._set_busy(False)
        if not isinstance(err, (SslSegError, ValueError, OSError)):
            log.error("napari-ssl-seg: opening the project failed", exc_info=err)
        return self._message(f"Cannot open the project: {err}", "error")

    def _reset_progress_bar(self) -> None:
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("")

    def _default_path(self, image) -> str:
        source = self._source_path(image)
        if source:
            return str(ann.default_project_path(source))
        folder = QFileDialog.getExistingDirectory(
            self, f"Folder for the project of '{image.name}'"
        )
        return str(ann.default_project_path(name=image.name, directory=folder)) if folder else ""

    @staticmethod
    def _source_path(layer) -> str | None:
        return getattr(layer.source, "path", None) or layer.metadata.get("napari_ssl_seg_source")

    def _browse_project(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Project, or the folder to create it in")
        if folder:
            image = self.image_layer_choice()
            name = image.name if image is not None else "volume"
            path = (
                folder
                if is_project(folder)
                else ann.default_project_path(name=name, directory=folder)
            )
            self.path_edit.setText(str(path))

    def _labels_choice(self):
        name = self.labels_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _attach_annotation_layer(self, labels, image, data: np.ndarray) -> None:
        if labels is None:
            labels = self.viewer.add_labels(
                data, name="annotations", scale=image.scale, translate=image.translate
            )
        else:
            labels.data = data  # the project's annotations (imported ones included)
        labels.metadata[PROJECT_KEY] = str(self.project.path)
        labels.metadata.pop(ANNOTATED_SLICES_KEY, None)  # imported: the project knows now
        _ready_to_paint(labels)
        self.viewer.layers.selection.active = labels
        self.annotation_layer = labels
        self._watch(labels, "annotation")
        self._refresh_layer_choices()

    def _close_project(self) -> None:
        self.flush()
        if self.session is not None:
            self.session.close()
        for layer in (self.annotation_layer, self.pseudo_layer):
            if layer is not None:
                self._unwatch(layer)
        self.session, self.annotation_layer, self.pseudo_layer = None, None, None
        self.confidence_layer, self.round, self._uncertain = None, 0, []
        self.uncertain_list.clear()

    # ======================================================== human edits
    def _watch(self, layer, kind: str) -> None:
        """Route the layer's strokes, undos and redos (which emit no paint event) to the
        session as ``kind`` ("annotation" or "correction") edits."""

        def on_item(item, undo: bool = False) -> None:
            session = self.session
            if session is None:
                return
            if undo:
                session.add_undo(kind, item)
            else:
                session.add_stroke(kind, item)
            if not self._save_timer.isActive():
                self._save_timer.start()  # not restarted per stroke: bounded latency

        relay = PaintRelay(on_item)
        layer.events.paint.connect(relay)
        watch_history(layer, on_item)
        self._relays[id(layer)] = relay

    def _unwatch(self, layer) -> None:
        relay = self._relays.pop(id(layer), None)
        if relay is not None:
            layer.events.paint.disconnect(relay)
        for name in ("undo", "redo"):
            layer.__dict__.pop(name, None)

    def _autosave(self) -> None:
        """Write the buffered strokes in the session's writer thread (the GUI goes on)."""
        session = self.session
        if session is None or not session.pending:
            return
        if self._round_loading or (
            self.job is not None and not self.job.finished and self._phase in ("", "load")
        ):
            # The child is reading the human labels: let it see one consistent state. Or
            # a round's labels are being merged for display: strokes wait, so that
            # _show_round can lay them over the new data (none is shown lost).
            self._save_timer.start()
            return
        self._save_async()

    def _save_async(self) -> None:
        session = self.session
        corrections = session.corrections.boxes() if self.pseudo_layer is not None else []
        future = session.flush_async(
            *self._layer_data(), round=self.round, merged_round=self._merged_round()
        )
        self._saving.append((future, self.round, corrections))
        self._reap_timer.start()
        self._show_saving()

    def _reap(self) -> None:
        """Show what the writer thread has finished writing, in the order submitted."""
        while self._saving and self._saving[0][0].done():
            future, r, _ = self._saving.pop(0)
            if future.exception() is not None:
                # The session keeps what it could not write and writes it first next time.
                self._message(
                    f"Strokes not saved yet ({future.exception()}); retrying.", "warning"
                )
                self._save_timer.start()
            else:
                self._show_saved(future.result(), r)
        if not self._saving:
            self._reap_timer.stop()
        self._show_saving()

    def _show_saving(self) -> None:
        """Say "saving…" while strokes are on their way to the project."""
        text = ""
        if self._saving:
            text = "saving…"
            if self._queued:
                text += f" ({', '.join(self._queued)} when saved)"
        self.save_label.setText(text)

    def _when_saved(self, then, what: str) -> None:
        """Call ``then()`` on the GUI thread once every stroke made so far is written.

        At once when nothing is being saved; else the pending strokes are handed to the
        writer thread and ``then`` runs when it is done (polled: the GUI never waits).
        """
        session = self.session
        self._save_timer.stop()
        if session.pending:
            self._save_async()
        futures = [future for future, _, _ in self._saving]
        if not futures:
            then()
            return
        self._queued.append(what)
        self._show_saving()

        def check() -> None:
            if self.session is not session or self._closed:
                return
            if not all(future.done() for future in futures):
                QTimer.singleShot(POLL_MS // 2, check)
                return
            self._queued.remove(what)
            self._reap()
            then()

        QTimer.singleShot(POLL_MS // 2, check)

    def flush(self) -> ann.Saved:
        """Write every pending stroke now and wait for it (the autosave does it in the
        background ``AUTOSAVE_MS`` after a stroke)."""
        self._save_timer.stop()
        session = self.session
        if session is None:
            return ann.Saved()
        session.wait()
        self._reap()
        try:
            saved = session.flush(
                *self._layer_data(), round=self.round, merged_round=self._merged_round()
            )
        except (SslSegError, ValueError) as err:
            self._message(f"Could not save the last strokes: {err}", "error")
            return ann.Saved()
        self._show_saved(saved, self.round)
        return saved

    @property
    def is_saved(self) -> bool:
        """True when every stroke is written to the project and shown."""
        return self.session is None or not (self.session.pending or self._saving)

    def _layer_data(self):
        return (
            None if self.annotation_layer is None else self.annotation_layer.data,
            None if self.pseudo_layer is None else self.pseudo_layer.data,
        )

    def _merged_round(self) -> int | None:
        return self.round if self.pseudo_layer is not None else None

    def _show_saved(self, saved: ann.Saved, r: int) -> None:
        if saved.merged and self.pseudo_layer is not None and r == self.round:
            # An annotated slice shows its human labels in the merged layer too; but the
            # merge was read before the corrections painted since (still buffered, or
            # submitted after this save): those voxels keep what the layer shows.
            later = self.session.corrections.boxes()
            later += [box for _, _, boxes in self._saving for box in boxes]
            for region, labels in saved.merged:
                keep = ann.covered_mask(later, region)
                labels = np.where(keep, self.pseudo_layer.data[region], labels)
                self.pseudo_layer.data[region] = labels
            self.pseudo_layer.refresh()
        if saved.edits:
            self._update_slice_info()

    def current_slice(self) -> int:
        """Index of the displayed slice along the project axis."""
        axis = self.project.axis if self.project is not None else 0
        layer = self.image_layer or self.image_layer_choice()
        world = self._world_axis(axis)
        scale = layer.scale[axis] if layer is not None else 1.0
        translate = layer.translate[axis] if layer is not None else 0.0
        i = round((self.viewer.dims.point[world] - translate) / scale)
        n = self.project.n_slices if self.project is not None else 1
        return int(min(max(i, 0), n - 1))

    def _world_axis(self, axis: int) -> int:
        """The viewer dimension of the volume's ``axis`` (the volume's 3 axes come last)."""
        return self.viewer.dims.ndim - 3 + axis

    def _slide_along(self, axis: int) -> None:
        """Show planes across the project axis in 2D, so the slider moves slice by slice
        (what painting, marking and the uncertain-slice list assume)."""
        dims = self.viewer.dims
        world = self._world_axis(axis)
        if dims.ndisplay == 2 and dims.order[-3] != world:
            lead = [d for d in dims.order if d < self._world_axis(0)]
            planes = [self._world_axis(a) for a in range(3) if a != axis]
            dims.order = (*lead, world, *planes)
            self.viewer.reset_view()  # the new plane has another extent: fit it

    def go_to_slice(self, i: int) -> None:
        axis = self.project.axis
        layer = self.image_layer
        world = self._world_axis(axis)
        self.viewer.dims.set_point(world, layer.translate[axis] + int(i) * layer.scale[axis])

    def toggle_slice_mark(self, i: int | None = None) -> None:
        """Mark slice ``i`` (default: current) as annotated (background where unpainted),
        or unmark it when it is annotated."""
        if not self._require_project():
            return
        i = self.current_slice() if i is None else int(i)
        self._when_saved(lambda: self._toggle_mark(i), f"mark slice {i}")

    def _toggle_mark(self, i: int) -> None:
        try:
            if i in self.session.annotated | self.session.corrected:
                self.session.unmark(i)
                region = self.session.slice_region(i)
                self.annotation_layer.data[region] = 0
                self.annotation_layer.refresh()
                self._message(
                    f"Slice {i} is no longer annotated: its human labels and corrections "
                    "are forgotten (the project's edit log keeps them)."
                )
            else:
                self.session.mark_annotated(i, self.annotation_layer.data)
                self._message(f"Slice {i} is annotated (unpainted voxels are background).")
            if self.pseudo_layer is not None:
                region = self.session.slice_region(i)
                self.pseudo_layer.data[region] = self.project.merged_labels(self.round, region)
                self.pseudo_layer.refresh()
        except (SslSegError, ValueError) as err:
            self._message(str(err), "error")
        self._update_slice_info()

    def accept_slice(self, i: int | None = None) -> None:
        """Record the whole slice ``i`` (default: current) of the pseudo-labels as
        human-verified corrections."""
        if not self._require_project():
            return
        if self.pseudo_layer is None:
            self._message("No pseudo-labels yet: train a round first.", "warning")
            return
        i = self.current_slice() if i is None else int(i)
        self._when_saved(lambda: self._accept(i), f"accept slice {i}")

    def _accept(self, i: int) -> None:
        try:
            self.session.accept_slice(i, self.pseudo_layer.data, round=self.round)
        except (SslSegError, ValueError) as err:
            self._message(str(err), "error")
            return
        self._message(f"Slice {i} accepted as correct (round {self.round}).")
        self._update_slice_info()

    def _update_slice_info(self, event=None) -> None:
        if self.session is None:
            return
        annotated, corrected = self.session.annotated, self.session.corrected
        self.annotated_label.setText(
            f"Annotated slices ({len(annotated)}): {ann.format_slices(annotated) or '–'}"
        )
        self.corrected_label.setText(
            f"Corrected slices ({len(corrected)}): {ann.format_slices(corrected) or '–'}"
        )
        i = self.current_slice()
        state = ["annotated" if i in annotated else "not annotated"]
        if i in corrected:
            state.append("corrected")
        self.slice_label.setText(f"Slice {i} of {self.project.n_slices}: {', '.join(state)}")
        human = i in annotated or i in corrected
        self.mark_button.setText("Unmark slice" if human else "Mark slice as background")

    # ============================================================ training
    def train(self) -> bool:
        """Start a round (Retrain once one exists) in a child process. True if started,
        or queued behind the strokes still being saved (the GUI does not wait for them)."""
        if not self._require_project():
            return False
        if self.job is not None:
            return self._message("A round is still running: Stop it first.", "warning")
        if "train" in self._queued:
            return self._message("Training starts once the last strokes are saved.")
        if self.session.pending or self._saving:
            self.train_button.setEnabled(False)
            self._when_saved(self._start_round, "train")
            return True
        return self._start_round()

    def _start_round(self) -> bool:
        self._set_busy(self.job is not None)
        if self.job is not None or self.session is None:
            return False
        try:
            self.session.check_trainable()
            config = ann.build_config(self.settings)
            job = TrainingJob(self.project.path, config)
        except (SslSegError, ValueError, TypeError) as err:
            return self._message(str(err), "warning")
        job.start()
        self.job, self._job_box[:] = job, [job]
        # napari asks before closing a window with a busy task, then cancels it.
        self._task = register_task(
            self.viewer,
            f"training round {self.project.latest_round + 1}",
            cancel=lambda: job.shutdown(STOP_TIMEOUT_S),
        )
        self._phase = ""
        self.loss_plot.clear()
        self.progress_bar.setRange(0, 0)  # busy until the child reports
        self.time_label.setText("starting the training process…")
        self._progress = progress(
            total=config.iterations, desc=f"SSL Seg: round {self.project.latest_round + 1}"
        )
        self._set_busy(True)
        self._poll_timer.start()
        return self._message(
            f"Training round {self.project.latest_round + 1} "
            f"({config.method}, {config.iterations} iterations)…"
        )

    def stop(self) -> None:
        """Stop at the next iteration; the round is still predicted and saved."""
        if self.job is not None and not self.job.finished:
            self.job.stop()
            self.stop_button.setEnabled(False)
            self._message("Stopping after this iteration; the round will still be saved.")

    def _poll(self) -> None:
        job = self.job
        if job is None:
            self._poll_timer.stop()
            return
        for kind, payload in job.poll():
            if kind == "progress":
                self._show_progress(payload)
            elif kind == "done":
                self._round_done(payload)
            else:
                self._round_failed(payload)
        if job.finished and not job.is_running:
            job.join(0)
            update_task(self.viewer, self._task, "FAILED" if job.error else "COMPLETED")
            self._task = None
            self.job, self._job_box[:] = None, []
            self._poll_timer.stop()
            self._set_busy(False)

    def _show_progress(self, report: dict) -> None:
        phase, it, total = report["phase"], int(report["iteration"]), int(report["total"])
        if report.get("choice"):
            self._message(f"Training round {self.project.latest_round + 1}: {report['choice']}…")
        if phase != self._phase:
            self._phase = phase
            self.progress_bar.setRange(0, max(total, 1))
            if self._progress is not None:
                self._progress.set_description(f"SSL Seg: {PHASES.get(phase, phase)}")
                self._progress.total = max(total, 1)
                self._progress.n = 0
        self.progress_bar.setValue(min(it, total))
        self.progress_bar.setFormat(f"{PHASES.get(phase, phase)} %v/%m")
        if self._progress is not None and it > self._progress.n:
            self._progress.update(it - self._progress.n)
        text = f"{_duration(report.get('elapsed', 0))} elapsed"
        if report.get("remaining") is not None:
            text += f" · ~{_duration(report['remaining'])} left"
        self.time_label.setText(text)
        if phase == "train" and "losses" in report:
            self.loss_plot.add(report["losses"].get("loss", np.nan))

    def _round_done(self, record: dict) -> None:
        self._end_progress()
        if self.session.pending:  # strokes on the old round's layer belong to the old round
            self._save_async()  # written before the merge below: one writer, in order
        self._round_loading = True  # until _show_round: strokes stay in the buffer
        self.progress_bar.setFormat(f"round {record['round']}: loading labels")
        # Merging a large volume takes seconds: the writer thread does it, we poll.
        future = self.session.round_labels_async(int(record["round"]))
        self._await(future, lambda merged: self._round_ready(record, merged))

    def _await(self, future, then) -> None:
        """Call ``then(result)`` on the GUI thread once ``future`` is done."""
        if self.session is None:  # the widget closed meanwhile
            self._round_loading = False
            return
        if not future.done():
            QTimer.singleShot(POLL_MS, lambda: self._await(future, then))
            return
        try:
            then(future.result())
        except (SslSegError, ValueError, OSError) as err:
            self._message(f"Round saved, but showing it failed: {err}", "error")
        finally:
            self._round_loading = False

    def _round_ready(self, record: dict, merged: np.ndarray) -> None:
        self._show_round(int(record["round"]), merged)
        self.show_step("Review")
        self._refresh_export_choices()
        early = (
            f", stopped early after {record['iterations_done']} iterations"
            if record.get("stopped_early")
            else ""
        )
        self.progress_bar.setFormat(f"round {record['round']} done")
        self._show_estimate(record)
        self._message(
            f"Round {record['round']} done ({record['method']}, {record['seconds']:.0f} s"
            f"{early}): correct its pseudo-labels, then Retrain.",
            notify=True,
        )

    def _round_failed(self, text: str) -> None:
        self._end_progress()
        log.error("napari-ssl-seg training failed:\n%s", text)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("failed")
        self.status_label.setToolTip(text)
        self._message(f"Training failed: {error_summary(text)}", "error")

    def _end_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def _set_busy(self, busy: bool) -> None:
        has_project = self.session is not None
        self.train_button.setEnabled(
            has_project and not busy and self._opening is None and "train" not in self._queued
        )
        self.stop_button.setEnabled(busy)
        self.open_button.setEnabled(not busy and self._opening is None)
        self.axis_combo.setEnabled(not busy and self._opening is None)
        for w in (self.mark_button, self.next_button, self.export_button):
            w.setEnabled(has_project)
        self.accept_button.setEnabled(has_project and self.round > 0)
        self.train_button.setText(
            f"Retrain (round {self.project.latest_round + 1})"
            if has_project and self.project.latest_round
            else "Train"
        )

    # ============================================================== rounds
    def _show_round(self, r: int, merged: np.ndarray | None = None) -> None:
        """Show round ``r``: merged labels (human on top), editable; confidence image.

        The round layers are reused when they exist (ours, or those our reader opened):
        making napari layers costs about a second of GUI time, new data costs little.
        """
        from napari.layers import Image, Labels

        project, image = self.project, self.image_layer
        pseudo = self._round_layer(Labels, "pseudo-labels · round", self.pseudo_layer)
        confidence = self._round_layer(Image, "confidence · round", self.confidence_layer)
        session_boxes = self.session.corrections.boxes() if pseudo is not None else []
        self._round_loading = False
        merged = project.merged_labels(r) if merged is None else merged
        common = {
            "scale": image.scale,
            "translate": image.translate,
            "metadata": {PROJECT_KEY: str(project.path)},
        }
        if confidence is None:
            confidence = self.viewer.add_image(
                project.confidence(r),
                name=f"confidence · round {r}",
                colormap="magma",
                contrast_limits=(0.0, 1.0),
                opacity=0.6,
                visible=False,
                **common,
            )
        else:
            confidence.data = project.confidence(r)
            confidence.name = f"confidence · round {r}"
        if pseudo is None:
            pseudo = self.viewer.add_labels(merged, name=f"pseudo-labels · round {r}", **common)
            _ready_to_paint(pseudo)
        else:
            # Strokes on the old round's layer not yet written are corrections of the old
            # round: their boxes are copied now, then laid over the new labels.
            kept = [(b.region, b.mask, np.array(pseudo.data[b.region])) for b in session_boxes]
            if self.session.pending:
                self._save_async()
            self._unwatch(pseudo)
            mode = pseudo.mode
            for region, mask, values in kept:  # ``merged`` is a fresh array: ours to change
                merged[region] = np.where(mask, values, merged[region])
            pseudo.data = merged
            pseudo.name = f"pseudo-labels · round {r}"
            # Toggling ``editable`` clears napari's undo history (public API): an undo
            # must not bring the previous round's labels back into this round's layer.
            pseudo.editable = False
            pseudo.editable = True
            pseudo.mode = mode
        layers = self.viewer.layers
        for layer in (confidence, pseudo):  # image < confidence < pseudo < annotations
            layers.move(layers.index(layer), layers.index(self.annotation_layer))
        self.confidence_layer, self.pseudo_layer = confidence, pseudo
        self.round = r
        self._watch(pseudo, "correction")
        self.viewer.layers.selection.active = pseudo  # the next strokes are corrections
        self._uncertain = [int(s["slice"]) for s in project.round_record(r)["uncertain_slices"]]
        self._uncertain_pos = -1
        self.uncertain_list.clear()
        for rank, s in enumerate(project.round_record(r)["uncertain_slices"], 1):
            # The score is the mean doubt (1 - confidence) over the slice's unlabelled voxels.
            doubt = 100 * float(s["uncertainty"])
            bar = "█" * min(10, round(doubt / 5)) or "▏"
            item = QListWidgetItem(f"#{rank}  slice {s['slice']}   {bar} {doubt:.0f} % unsure")
            item.setData(Qt.ItemDataRole.UserRole, int(s["slice"]))
            self.uncertain_list.addItem(item)
        self.project_label.setText(
            f"{project.path.name}: {' × '.join(map(str, project.shape))}, {r} round(s)"
        )
        self._show_estimate(project.round_record(r))
        self._set_busy(self.job is not None)

    def _show_estimate(self, record: dict) -> None:
        """The round's quality estimate on held-out human labels, in the Review tab."""
        from napari_ssl_seg.validation import validation_lines

        lines = validation_lines(record)
        self.estimate_label.setText(
            "\n".join(lines) if lines else f"Round {record['round']}: no validation estimate."
        )

    def _round_layer(self, kind, prefix: str, current):
        """Our round layer of ``kind``, or one that our reader opened for this project."""
        if current is not None and current in self.viewer.layers:
            return current
        path = str(self.project.path)
        found = [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, kind)
            and layer.name.startswith(prefix)
            and layer.metadata.get(PROJECT_KEY) == path
        ]
        return found[0] if found else None

    def next_uncertain(self) -> int | None:
        """Jump to the next of the least confident slices (cycling); returns it."""
        if not self._uncertain:
            self._message("No uncertain slices yet: train a round first.", "warning")
            return None
        self._uncertain_pos = (self._uncertain_pos + 1) % len(self._uncertain)
        self.uncertain_list.setCurrentRow(self._uncertain_pos)
        i = self._uncertain[self._uncertain_pos]
        self.go_to_slice(i)
        return i

    def _jump_to_item(self, item) -> None:
        self._uncertain_pos = self.uncertain_list.row(item)
        self.go_to_slice(item.data(Qt.ItemDataRole.UserRole))

    # ============================================================== export
    def _refresh_export_choices(self) -> None:
        self.export_combo.clear()
        if self.project is None:
            return
        self.export_combo.addItem("merged, latest round", (None, True))
        for rec in reversed(self.project.rounds()):
            r = rec["round"]
            self.export_combo.addItem(f"round {r}, merged", (r, True))
            self.export_combo.addItem(f"round {r}, model only", (r, False))

    def export(
        self,
        path: str | Path,
        *,
        round: int | None = None,
        merged: bool = True,
        overwrite: bool = False,
    ) -> Path | None:
        """Write the labels to ``path`` (tif, NIfTI or OME-Zarr by extension); an
        existing file only with ``overwrite``."""
        if not self._require_project():
            return None
        self.flush()
        try:
            written = ann.export_labels(
                self.project, path, round=round, merged=merged, overwrite=overwrite
            )
        except (SslSegError, ValueError, OSError) as err:
            self._message(f"Export failed: {err}", "error")
            return None
        self._message(f"Exported to {written}.", notify=True)
        return written

    def _export_clicked(self) -> None:
        if not self._require_project():
            return
        r, merged = self.export_combo.currentData() or (None, True)
        fmt = self.format_combo.currentText()
        default = ann.default_export_path(self.project, fmt, round=r, merged=merged)
        path, _ = QFileDialog.getSaveFileName(self, "Export masks", str(default))
        if path:  # the save dialog has asked before naming an existing file
            self._when_saved(
                lambda: self.export(path, round=r, merged=merged, overwrite=True), "export"
            )

    # ============================================================ settings
    def _apply_settings(self) -> None:
        combos = (self.method_combo, self.preset_combo, self.device_combo, self.format_combo)
        for combo in combos:
            combo.blockSignals(True)
        self._fill_methods()
        self._fill_presets()
        self.device_combo.setCurrentText(self.settings["device"])
        self.format_combo.setCurrentText(self.settings["export_format"])
        for combo in combos:
            combo.blockSignals(False)

    def _fill_methods(self) -> None:
        """The method list, once the registry has loaded (torch and MONAI take seconds to
        import, so that happens in a thread; until then only the chosen method is listed)."""
        names = self._method_names[0] if self._method_names else None
        if names is not None and self._names_timer.isActive():
            self._names_timer.stop()
        wanted = self.settings["method"]
        if names is not None and wanted not in names:
            fallback = ann.default_settings()["method"]
            if self.session is not None:
                self._message(
                    f"Unknown method {wanted!r} in the saved settings; using {fallback!r}.",
                    "warning",
                )
            self.settings["method"] = wanted = fallback
        blocked = self.method_combo.blockSignals(True)
        self.method_combo.clear()
        self.method_combo.addItems(names or [wanted])
        self.method_combo.setCurrentText(wanted)
        self.method_combo.blockSignals(blocked)

    def _fill_presets(self) -> None:
        """The budget presets, and "custom" while the overrides set the iterations."""
        blocked = self.preset_combo.blockSignals(True)
        self.preset_combo.clear()
        for name, iterations in PRESETS.items():
            self.preset_combo.addItem(f"{name} ({iterations} it.)", name)
        custom = self.settings["overrides"].get("iterations")
        if custom:
            self.preset_combo.addItem(f"custom ({custom} it.)", "custom")
            self.preset_combo.setCurrentIndex(self.preset_combo.count() - 1)
        else:
            self.preset_combo.setCurrentIndex(self.preset_combo.findData(self.settings["preset"]))
        self.preset_combo.blockSignals(blocked)

    def _choose_preset(self, name: str | None) -> None:
        if name in (None, "custom"):
            return
        overrides = self.settings["overrides"]
        if "iterations" in overrides:  # a preset replaces custom iterations
            self.settings["overrides"] = {k: v for k, v in overrides.items() if k != "iterations"}
            self._fill_presets()
            self.preset_combo.setCurrentIndex(self.preset_combo.findData(name))
        self.settings["preset"] = None  # force the save below
        self._set_setting("preset", name)

    def _set_setting(self, key: str, value) -> None:
        if not value or self.settings.get(key) == value:
            return
        self.settings[key] = value
        self.save_settings()

    def set_overrides(self, **values) -> None:
        """TrainConfig fields to use on top of method/preset/device (saved with the project)."""
        settings = {**self.settings, "overrides": dict(values)}
        ann.build_config(settings)  # fail now, with the field's name, if invalid
        self.settings = settings
        self._fill_presets()
        self.save_settings()

    def save_settings(self) -> None:
        if self.project is not None:
            ann.save_settings(self.project.path, self.settings)

    # ========================================================= plumbing
    def _refresh_layer_choices(self, event=None) -> None:
        from napari.layers import Image, Labels

        ours = {id(self.pseudo_layer)}
        for combo, kind, extra in (
            (self.image_combo, Image, []),
            (self.labels_combo, Labels, [NEW_LAYER]),
        ):
            current = combo.currentText()
            names = extra + [
                lay.name
                for lay in self.viewer.layers
                if isinstance(lay, kind)
                and id(lay) not in ours
                and not lay.name.startswith(("confidence · round", "pseudo-labels · round"))
            ]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            elif kind is Labels and "annotations" in names:
                combo.setCurrentText("annotations")
            combo.blockSignals(False)
        if self.annotation_layer is not None and self.annotation_layer.name in self.viewer.layers:
            self.labels_combo.setCurrentText(self.annotation_layer.name)

    def _layer_removing(self, event) -> None:
        layer = self.viewer.layers[event.index]
        if layer is self.annotation_layer or layer is self.pseudo_layer:
            self.flush()  # the data is still there: save the last strokes
            self._unwatch(layer)
            if layer is self.annotation_layer:
                self.annotation_layer = None
            else:
                self.pseudo_layer = None
        if layer is self.image_layer:
            self.image_layer = None

    def _require_project(self) -> bool:
        if self.session is None or self.image_layer is None or self.annotation_layer is None:
            self.show_step("Project")
            self._message("Open a project first (Project tab: Open / create project).", "warning")
            return False
        return True

    def _message(self, text: str, level: str = "info", *, notify: bool | None = None) -> bool:
        """Show ``text`` in the status line; warnings and errors (and ``notify``) also
        as napari notifications. Returns True for "info" (a success)."""
        self.status_label.setText(text)
        if notify if notify is not None else level != "info":
            {"info": show_info, "warning": show_warning, "error": show_error}[level](text)
        return level == "info"

    def _bind_keys(self) -> None:
        ref = weakref.ref(self)

        def handler(name):
            def call(viewer):
                widget = ref()
                if widget is not None:
                    getattr(widget, name)()

            return call

        for key, name in SHORTCUTS.items():
            self._unbound[key] = self.viewer.bind_key(key, handler(name), overwrite=True)

    def _unbind_keys(self) -> None:
        for key, previous in self._unbound.items():
            self.viewer.bind_key(key, previous, overwrite=True)
        self._unbound = {}

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt name
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Save pending strokes and settings, stop a running round (kill it after
        ``STOP_TIMEOUT_S``), release the viewer's shortcuts. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for timer in (self._save_timer, self._poll_timer, self._reap_timer, self._names_timer):
            timer.stop()
        try:
            self.flush()
            self.save_settings()
            if self.session is not None:
                self.session.close()
        except Exception as err:  # noqa: BLE001 - closing must not fail
            log.warning("napari-ssl-seg: could not save on close: %s", err)
        if self.job is not None:
            self.job.shutdown(STOP_TIMEOUT_S)
            self.job, self._job_box[:] = None, []
            update_task(self.viewer, self._task, "CANCELLED")
        self._end_progress()
        self._unbind_keys()
        for layer in (self.annotation_layer, self.pseudo_layer):
            if layer is not None:
                self._unwatch(layer)
        for emitter, slot in (
            (self.viewer.layers.events.inserted, self._refresh_layer_choices),
            (self.viewer.layers.events.removed, self._refresh_layer_choices),
            (self.viewer.layers.events.removing, self._layer_removing),
            (self.viewer.dims.events.current_step, self._update_slice_info),
        ):
            emitter.disconnect(slot)


# ================================================================ helpers
def _ready_to_paint(layer) -> None:
    """Open a Labels layer with the brush (napari opens it in pan/zoom: the first drag
    would pan), painting the first class, in the displayed plane only."""
    layer.mode = "paint"
    layer.selected_label = max(int(layer.selected_label), 1)
    layer.n_edit_dimensions = 2


def _load_method_names(out: list) -> None:
    from napari_ssl_seg.methods import method_names

    out.append([AUTO, *method_names()])


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(float(seconds))))
    return time.strftime("%M:%S" if seconds < 3600 else "%H:%M:%S", time.gmtime(seconds))
