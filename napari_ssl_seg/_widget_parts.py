"""Qt parts of the napari widget: its layout, the loss plot and small napari adapters.

Only :mod:`napari_ssl_seg._widget` imports this module; it holds no project or training
logic. ``WidgetLayout`` builds the dock's groups and stores their controls on the widget
(``self.train_button`` and so on); the behaviour behind them lives in ``SslSegWidget``.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_ssl_seg import annotation as ann
from napari_ssl_seg.config import AUTO_ONE_SLICE_METHOD


class LossPlot(QWidget):
    """A small live loss curve (a polyline; no plotting library needed)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.values: list[float] = []
        self.setMinimumHeight(70)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def add(self, value: float) -> None:
        if np.isfinite(value):
            self.values.append(float(value))
            self.update()

    def clear(self) -> None:
        self.values = []
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = self.rect().adjusted(2, 2, -2, -2)
        painter.fillRect(rect, QColor(0, 0, 0, 60))
        painter.setPen(QColor(170, 170, 170))
        if len(self.values) < 2:
            painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, "loss curve")
            return
        step = max(1, len(self.values) // max(rect.width(), 1))
        values = np.asarray(self.values[::step])
        lo, hi = float(values.min()), float(values.max())
        span = hi - lo or 1.0
        top, height = rect.top() + 14, rect.height() - 16
        xs = rect.left() + np.linspace(0, rect.width(), len(values))
        ys = top + height * (1 - (values - lo) / span)
        painter.drawText(
            rect.adjusted(4, 0, -4, 0), Qt.AlignmentFlag.AlignLeft, f"loss {self.values[-1]:.3f}"
        )
        painter.drawText(
            rect.adjusted(4, 0, -4, 0), Qt.AlignmentFlag.AlignRight, f"{lo:.3f} – {hi:.3f}"
        )
        painter.setPen(QPen(QColor(90, 180, 255), 1.5))
        painter.drawPolyline(QPolygonF([QPointF(x, y) for x, y in zip(xs, ys, strict=True)]))


class WidgetLayout:
    """Mixin of ``SslSegWidget``: builds the five groups and the status line.

    The callbacks it connects (``open_project``, ``train``, ``_set_setting`` ...) are
    the widget's.
    """

    def _build(self) -> None:
        # Tabs, one per step of the loop, so that the whole widget fits napari's default
        # window; the status line and "saving…" stay in view below them.
        self.tabs = QTabWidget()
        self.tabs.setUsesScrollButtons(True)
        for title, build in (
            ("Project", self._build_project),
            ("Annotate", self._build_annotate),
            ("Train", self._build_train),
            ("Review", self._build_review),
            ("Export", self._build_export),
        ):
            group = build()
            group.setTitle("")
            page = QWidget()
            column = QVBoxLayout(page)
            column.setContentsMargins(2, 2, 2, 2)
            column.addWidget(group)
            column.addStretch(1)
            scroll = QScrollArea(widgetResizable=True)
            scroll.setWidget(page)
            scroll.setFrameShape(QScrollArea.Shape.NoFrame)
            scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
            self.tabs.addTab(scroll, title)
        self.status_label = wrapping_label("")
        # "saving…" while strokes are on their way to the project
        self.save_label = wrapping_label("", muted=True)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.tabs, 1)
        outer.addWidget(self.progress_bar)  # from the Train tab: a round shows everywhere
        outer.addWidget(self.status_label)
        outer.addWidget(self.save_label)
        self.setMinimumWidth(300)

    def show_step(self, title: str) -> None:
        """Bring the tab of a step of the loop ("Annotate", "Review" ...) to the front."""
        for k in range(self.tabs.count()):
            if self.tabs.tabText(k) == title:
                self.tabs.setCurrentIndex(k)

    def _build_project(self) -> QGroupBox:
        group = QGroupBox("Project")
        form = QFormLayout(group)
        self.image_combo = combo()
        self.labels_combo = combo()
        self.path_edit = QLineEdit(placeholderText="<image>.ssl.zarr beside its file")
        self.path_edit.setToolTip(
            "The project directory; empty: <image name>.ssl.zarr "
            "beside the image file (or a folder you choose)"
        )
        browse = QPushButton("Browse…", clicked=self._browse_project)
        row = QHBoxLayout()
        row.addWidget(self.path_edit, 1)
        row.addWidget(browse)
        self.open_button = QPushButton(
            "Open / create project", clicked=lambda: self.open_project()
        )
        self.axis_combo = combo()
        self.axis_combo.addItems(AXIS_CHOICES)
        self.axis_combo.setToolTip(
            "The axis a new project is sliced along: you annotate, train and review "
            "planes across it (the viewer's slider moves along it). An existing project "
            "keeps the axis it was made with."
        )
        self.project_label = wrapping_label("No project open.")
        form.addRow("Image", self.image_combo)
        form.addRow("Annotations", self.labels_combo)
        form.addRow("Slice axis", self.axis_combo)
        form.addRow("Project", row)
        form.addRow(self.open_button)
        form.addRow(self.project_label)
        return group

    def _build_annotate(self) -> QGroupBox:
        group = QGroupBox("Annotate")
        lay = QVBoxLayout(group)
        lay.addWidget(
            wrapping_label(
                "A painted slice counts as fully annotated: unpainted voxels are background.",
                muted=True,
            )
        )
        self.annotated_label = wrapping_label("Annotated slices: –")
        self.corrected_label = wrapping_label("Corrected slices: –")
        self.slice_label = wrapping_label("Slice –")
        # Not ``clicked=self.toggle_slice_mark``: Qt passes ``checked=False``, slice 0.
        self.mark_button = QPushButton(
            "Mark slice as background", clicked=lambda: self.toggle_slice_mark()
        )
        self.mark_button.setToolTip(
            "Count the current slice as annotated even if it is "
            "empty (all background), or forget its annotation"
        )
        for w in (self.annotated_label, self.corrected_label, self.slice_label, self.mark_button):
            lay.addWidget(w)
        return group

    def _build_train(self) -> QGroupBox:
        group = QGroupBox("Train")
        form = QFormLayout(group)
        self.method_combo = combo()
        self.preset_combo = combo()
        self.device_combo = combo()
        self.device_combo.addItems(ann.DEVICES)
        self.method_combo.setToolTip(
            f"auto: {AUTO_ONE_SLICE_METHOD} when one slice is annotated (it learns from the\n"
            "unlabelled slices too; about 30 s a round on a laptop CPU), supervised from\n"
            "two annotated slices on (about 20 s).\n"
            "diffusion: ~9x slower per iteration than supervised on a CPU.\n"
            "napari-ssl-seg methods lists every method and its settings."
        )
        self.preset_combo.setToolTip("Training iterations per round.")
        form.addRow("Method", self.method_combo)
        form.addRow("Budget", self.preset_combo)
        form.addRow("Device", self.device_combo)
        self.train_button = QPushButton("Train", clicked=lambda: self.train())
        self.train_button.setToolTip("Train a round in the background (Shift-T)")
        self.stop_button = QPushButton("Stop", clicked=lambda: self.stop())
        self.stop_button.setToolTip("Stop at the next iteration; the round is still saved")
        row = QHBoxLayout()
        row.addWidget(self.train_button, 1)
        row.addWidget(self.stop_button, 1)
        form.addRow(row)
        self.progress_bar = QProgressBar(textVisible=True)
        self.time_label = QLabel("")
        self.loss_plot = LossPlot()
        for w in (self.progress_bar, self.time_label, self.loss_plot):
            form.addRow(w)
        self._fill_presets()
        self.method_combo.currentTextChanged.connect(lambda v: self._set_setting("method", v))
        self.preset_combo.currentIndexChanged.connect(
            lambda _: self._choose_preset(self.preset_combo.currentData())
        )
        self.device_combo.currentTextChanged.connect(lambda v: self._set_setting("device", v))
        return group

    def _build_review(self) -> QGroupBox:
        group = QGroupBox("Least confident slices")
        lay = QVBoxLayout(group)
        self.uncertain_list = QListWidget()
        self.uncertain_list.setMaximumHeight(220)
        self.uncertain_list.itemActivated.connect(self._jump_to_item)
        self.uncertain_list.itemClicked.connect(self._jump_to_item)
        row = QHBoxLayout()
        self.next_button = QPushButton("Next uncertain (N)", clicked=lambda: self.next_uncertain())
        self.accept_button = QPushButton("Accept slice (A)", clicked=lambda: self.accept_slice())
        self.accept_button.setToolTip(
            "Record the whole current slice of the pseudo-labels as human-verified"
        )
        row.addWidget(self.next_button, 1)
        row.addWidget(self.accept_button, 1)
        # What the round's check on held-out human labels measured, and what it wrote.
        self.estimate_label = wrapping_label("")
        self.estimate_label.setToolTip(
            "Each round holds out a band of every annotated slice, scores the network, "
            "the pixel forest and their mean there, and writes the best."
        )
        lay.addWidget(self.estimate_label)
        lay.addWidget(self.uncertain_list)
        lay.addLayout(row)
        return group

    def _build_export(self) -> QGroupBox:
        group = QGroupBox("Export masks")
        form = QFormLayout(group)
        self.export_combo = combo()
        self.format_combo = combo()
        self.format_combo.addItems(ann.EXPORT_FORMATS)
        self.export_button = QPushButton("Export…", clicked=self._export_clicked)
        form.addRow("Labels", self.export_combo)
        form.addRow("Format", self.format_combo)
        form.addRow(self.export_button)
        self.format_combo.currentTextChanged.connect(
            lambda v: self._set_setting("export_format", v)
        )
        return group


# ================================================================ napari adapters
def register_task(viewer, description: str, *, cancel):
    # napari (>= 0.6) keeps long-running tasks on the window (still private API): closing
    # it then asks for confirmation and calls ``cancel``. Without it we still stop the
    # child from ``destroyed``.
    register = getattr(viewer.window, "_register_task_status", None)
    if register is None:
        return None
    from napari.utils.task_status import Status

    return register("napari-ssl-seg", Status.BUSY, description, cancel_callback=cancel)


def update_task(viewer, task, status: str) -> None:
    update = getattr(viewer.window, "_update_task_status", None)
    if task is None or update is None:
        return
    from napari.utils.task_status import Status

    update(task, Status[status])


class PaintRelay:
    """Callable connected to ``events.paint``; kept so that it can be disconnected."""

    def __init__(self, on_item) -> None:
        self.on_item = on_item

    def __call__(self, event) -> None:
        self.on_item(event.value)


def watch_history(layer, on_item) -> None:
    # napari (0.9) applies undo/redo without a paint event; wrap this layer's undo and
    # redo (what the Ctrl-Z actions call) to report the item they replayed, with
    # ``undo=True`` for an undo. The item they move to the other deque is the one applied.
    undo, redo = layer.undo, layer.redo

    def replay(method, after: str, undoing: bool):
        def call():
            before = len(getattr(layer, "_" + after, ()))
            method()
            moved = getattr(layer, "_" + after, ())
            if len(moved) > before or (moved and len(moved) == moved.maxlen):
                on_item(moved[-1], undo=undoing)

        return call

    layer.undo = replay(undo, "redo_history", True)
    layer.redo = replay(redo, "undo_history", False)


# ================================================================ small Qt helpers
#: Slice-axis choices of a new project, by index (the volume's axes 0, 1, 2).
AXIS_CHOICES = ("0 (Z: planes Y-X)", "1 (Y: planes Z-X)", "2 (X: planes Z-Y)")


def combo() -> QComboBox:
    combo = QComboBox()
    # Shrink with the dock instead of growing to the longest entry.
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(8)
    return combo


def wrapping_label(text: str, *, muted: bool = False) -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    if muted:
        label.setStyleSheet("color: gray;")
    return label
