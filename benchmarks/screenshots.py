"""Screenshots of the SSL Seg widget through the annotation loop, and its timings.

    python benchmarks/screenshots.py [--out docs/screenshots] [--iterations 60]

Starts a virtual X display (Xvfb, through pyvirtualdisplay) when there is none, opens
the bundled nuclei sample (60 x 256 x 256, three annotated slices) in a napari window
of 1500 x 950 pixels, docks the widget and drives it as an annotator would:

1. ``01_annotated.png``     the project is created, the sample's slices imported;
2. ``02_training.png``      round 1 trains in the child process (progress, loss curve);
3. ``03_pseudo_labels.png`` round 1's pseudo-labels, the least confident slice shown;
4. ``04_corrected.png``     that slice corrected (from the ground truth) and accepted;
5. ``05_round2.png``        round 2 (annotations + correction), its confidence map
                               shown, the widget scrolled down to Export.

It prints how long each phase took. Look at the PNGs: nothing clipped, all readable.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = (1500, 950)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument(
        "--iterations",
        type=int,
        default=60,
        help="iterations per round (the 'quick' preset is 150)",
    )
    args = parser.parse_args(argv)
    display = None
    if not os.environ.get("DISPLAY"):
        from pyvirtualdisplay import Display

        display = Display(visible=False, size=(SIZE[0] + 100, SIZE[1] + 100), color_depth=24)
        display.start()
    try:
        run(args.out, args.iterations)
    finally:
        if display is not None:
            display.stop()
    return 0


def run(out: Path, iterations: int) -> None:
    import napari
    from qtpy.QtWidgets import QApplication, QScrollArea

    from napari_ssl_seg._sample_data import load_nuclei
    from napari_ssl_seg._widget import SslSegWidget

    out.mkdir(parents=True, exist_ok=True)
    _, truth, _ = load_nuclei()
    viewer = napari.Viewer(show=True)
    viewer.window.resize(*SIZE)
    viewer.open_sample("napari-ssl-seg", "nuclei")
    widget = SslSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="SSL Seg: annotate and train", area="right")

    def wait(condition, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the widget did not get there in time")
            QApplication.processEvents()
            time.sleep(0.02)

    def shot(name: str) -> None:
        for _ in range(20):  # let layouts and the canvas settle
            QApplication.processEvents()
            time.sleep(0.02)
        viewer.screenshot(str(out / name), canvas_only=False, flash=False)
        print(f"  saved {out / name}")

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        widget.path_edit.setText(str(Path(tmp) / "nuclei.ssl.zarr"))
        assert widget.open_project(wait=True), widget.status_label.text()
        widget.set_overrides(iterations=iterations)
        widget.go_to_slice(30)
        wait(lambda: widget.method_combo.count() > 1, 60)
        print(
            f"1. project open, slices {sorted(widget.session.annotated)} imported "
            f"({time.monotonic() - started:.1f} s)"
        )
        shot("01_annotated.png")

        t = time.monotonic()
        assert widget.train()
        wait(lambda: widget._phase == "train" and widget.progress_bar.value() >= iterations // 3)
        print(
            f"2. training, {widget.progress_bar.value()}/{iterations} iterations "
            f"({time.monotonic() - t:.1f} s after Train)"
        )
        viewer.window._status_bar._toggle_activity_dock(True)  # napari's own progress bar
        shot("02_training.png")
        viewer.window._status_bar._toggle_activity_dock(False)
        wait(lambda: widget.job is None and widget.round == 1)
        print(f"   round 1 done {time.monotonic() - t:.1f} s after Train")

        z = widget.next_uncertain()
        print(f"3. pseudo-labels of round 1; least confident slice {z}")
        shot("03_pseudo_labels.png")

        pseudo = widget.pseudo_layer
        wrong = np.nonzero(pseudo.data[z] != truth[z])
        pseudo.data_setitem((np.full(wrong[0].size, z), *wrong), truth[z][wrong])
        widget.accept_slice()
        wait(lambda: widget.is_saved, 30)
        print(f"4. slice {z}: {wrong[0].size} voxels corrected, slice accepted")
        shot("04_corrected.png")

        t = time.monotonic()
        assert widget.train()
        wait(lambda: widget.job is None and widget.round == 2)
        z2 = widget.next_uncertain()
        widget.confidence_layer.visible = True  # the confidence map, under the labels
        scroll = widget.findChild(QScrollArea)
        scroll.verticalScrollBar().setValue(scroll.verticalScrollBar().maximum())  # Export
        print(
            f"5. round 2 done {time.monotonic() - t:.1f} s after Retrain; "
            f"least confident slice now {z2}"
        )
        shot("05_round2.png")
        widget.close()
        viewer.close()
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
