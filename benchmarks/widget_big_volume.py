"""Event-loop lateness of the widget on a 300 x 512 x 512 volume, phase by phase.

Builds a 300x512x512 uint16 volume by tiling the nuclei sample, opens it in a real napari
viewer (needs a display: run under ``xvfb-run -a``), creates the project, paints two
slices, trains a short round in the child process and, while everything runs, records how
late a 20 ms QTimer fires (a frozen GUI shows up as a large lateness). Then paints a
correction on the pseudo-label layer and waits for it to reach the store.

    xvfb-run -a python benchmarks/widget_big_volume.py --iterations 20

Prints the lateness per phase (loading, training, predicting, showing the round, saving
a correction) and the wall time of each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile


def big_volume(shape=(300, 512, 512)) -> tuple[np.ndarray, np.ndarray]:
    from napari_ssl_seg._sample_data import load_nuclei

    image, truth, _ = load_nuclei()
    reps = [int(np.ceil(s / n)) for s, n in zip(shape, image.shape, strict=True)]
    crop = tuple(slice(0, s) for s in shape)
    return np.tile(image, reps)[crop].copy(), np.tile(truth, reps)[crop].copy()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--depth", type=int, default=300)
    parser.add_argument("--side", type=int, default=512)
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_ssl_seg._widget import SslSegWidget

    image, truth = big_volume((args.depth, args.side, args.side))
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "big.tif"
    tifffile.imwrite(path, image)
    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    phases: dict[str, list[float]] = {}
    state = {"phase": "open", "last": time.perf_counter()}

    def tick():
        now = time.perf_counter()
        phases.setdefault(state["phase"], []).append(max(0.0, (now - state["last"]) * 1000 - 20))
        state["last"] = now

    clock = QTimer(interval=20)
    clock.timeout.connect(tick)
    clock.start()

    def run_until(predicate, timeout=1800.0):
        end = time.time() + timeout
        while not predicate() and time.time() < end:
            app.processEvents()
            time.sleep(0.005)

    started = {}

    def enter(name):
        state["phase"] = name
        started[name] = time.time()

    enter("read image")  # napari's own open: our reader, then napari makes the layer
    viewer.open(path, plugin="napari-ssl-seg")
    widget = SslSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="SSL Seg")
    enter("create project")  # the copy into the Zarr project runs in a thread worker
    assert widget.open_project(wait=True), widget.status_label.text()
    for z in (40, 150):
        yy, xx = np.nonzero(truth[z])
        widget.annotation_layer.data_setitem((np.full(yy.size, z), yy, xx), 1)
    run_until(lambda: widget.method_combo.count() > 1, 120)
    widget.set_overrides(iterations=args.iterations)
    enter("load+train")
    assert widget.train(), widget.status_label.text()
    run_until(lambda: widget._phase == "predict")
    enter("predict")
    run_until(lambda: widget.job is None)
    enter("show round")
    run_until(lambda: widget.round == 1)
    enter("idle")
    t0 = time.time()
    while time.time() - t0 < 2:
        app.processEvents()
    enter("correct + save")
    z = 200
    block = widget.pseudo_layer.data[z, 100:164, 100:164]
    zz, yy, xx = np.meshgrid([z], np.arange(100, 164), np.arange(100, 164), indexing="ij")
    flipped = (1 - block).astype(block.dtype)  # a change on every voxel of the box
    widget.pseudo_layer.data_setitem((zz.ravel(), yy.ravel(), xx.ravel()), flipped.ravel())
    run_until(lambda: z in widget.session.corrected and widget.is_saved, 60)
    assert (np.asarray(widget.project.corrected[z, 100:164, 100:164]) > 0).all()
    enter("end")
    clock.stop()
    print(f"volume {image.shape}, {args.iterations} iterations")
    names = list(started)
    for a, b in zip(names, names[1:], strict=False):
        late = np.asarray(phases.get(a, [0.0]))
        print(
            f"{a:16s} {started[b] - started[a]:7.1f} s   lateness mean {late.mean():6.1f} ms  "
            f"p95 {np.percentile(late, 95):6.1f} ms  max {late.max():7.1f} ms"
        )
    widget.close()
    viewer.close()


if __name__ == "__main__":
    main()
