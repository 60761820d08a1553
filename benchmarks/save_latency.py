"""How fast a brush stroke reaches the project: dense painting of one slice, no Qt.

A real napari ``Labels`` layer (no viewer) is brush-painted as a mouse drag paints it:
one history item per drag (``_begin_stroke``/``_draw``/``_commit_stroke``, the masked
paint atoms napari records, one dab per interpolated cursor position), rows of the
brush's width painted in ``--per-row`` drags each until the slice is covered. Each item goes to
:meth:`AnnotationSession.add_stroke` when the drag ends, and the widget's autosave
schedule is replayed: ``flush_async`` ``AUTOSAVE_MS`` after the first stroke not yet
submitted. Painted at ``--drag-seconds`` per row: faster than most hands, so the writer
has less time than with a real annotator.

Measured, per slice size and layer (annotations: whole-slice edits; pseudo-labels:
corrections of a round written here without training):

- stroke → on disk: from the end of a drag to the end of the write that holds it
  (p50 / max), which is what the README promises to keep within a second;
- writer busy: seconds the writer thread spent writing the whole dense slice;
- GUI time per autosave: what ``flush_async`` costs the calling (GUI) thread;
- flush blocks: a synchronous :meth:`AnnotationSession.flush` called right after the
  last drag (what Train used to do on the GUI thread).

Run::

    python benchmarks/save_latency.py                 # 512 x 512 and 2048 x 2048 slices
    python benchmarks/save_latency.py --sizes 512 --drags 20

Prints the machine, the command and one table; ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, cpu_name  # noqa: E402

AUTOSAVE_S = 0.25  # napari_ssl_seg._widget.AUTOSAVE_MS (not imported: that loads Qt)
EVENT_S = 1 / 60  # mouse-move events of a drag


def make_project(path: Path, size: int, depth: int):
    """A project of ``depth`` slices of ``size`` x ``size`` with one committed round."""
    from napari_ssl_seg.store import Project

    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (depth, size, size), dtype=np.uint16)
    project = Project.create(path, image)
    writer = project.begin_round()
    zeros = np.zeros((depth, size, size), np.uint16)
    writer.write(..., zeros, np.full(zeros.shape, 0.5, np.float32))
    writer.commit({"uncertain_slices": [], "method": "none"}, b"not a checkpoint")
    return project


def drags(size: int, brush: int, per_row: int, n_drags: int | None):
    """Cursor paths of drags covering the slice: rows of the brush's width, each row
    painted in ``per_row`` drags (a hand paints a large area in short strokes)."""
    paths = []
    width = size / per_row
    for k, y in enumerate(range(brush // 2, size, brush)):
        for j in range(per_row):
            xs = np.linspace(j * width, min((j + 1) * width + brush / 2, size - 1), 12)
            paths.append([(y, x) for x in (xs if k % 2 == 0 else xs[::-1])])
    return paths[:n_drags] if n_drags is not None else paths


def paint_slice(session, layer, kind: str, z: int, args, data_of) -> dict:
    """Brush-paint slice ``z`` of ``layer`` on the autosave schedule; returns figures."""
    from napari_ssl_seg.annotation import AnnotationSession

    busy = [0.0]
    original = session._write

    def timed_write(*a, **k):  # the writer thread's time on each submitted flush
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            busy[0] += time.perf_counter() - t0

    session._write = timed_write
    emitted: list[tuple[float, list]] = []  # (drag end, [done time]) per stroke
    futures = []
    gui_per_save: list[float] = []
    deadline = [None]
    label = 2 if kind == "annotation" else 3
    layer.brush_size = args.brush
    layer.mode = "paint"
    pending: list[list] = []

    def autosave(now: float) -> None:
        if deadline[0] is not None and now >= deadline[0]:
            t0 = time.perf_counter()
            future = session.flush_async(*data_of(), round=1, merged_round=1)
            gui_per_save.append(time.perf_counter() - t0)
            for box in pending:
                future.add_done_callback(lambda _f, box=box: box.append(time.perf_counter()))
            futures.append(future)
            pending.clear()
            deadline[0] = None

    start = time.perf_counter()
    clock = start
    for path in drags(layer.data.shape[1], args.brush, args.per_row, args.drags):
        layer._begin_stroke()
        last = None
        for y, x in path:
            clock += args.drag_seconds / len(path)
            while time.perf_counter() < clock:
                autosave(time.perf_counter())
                time.sleep(min(EVENT_S / 4, max(0.0, clock - time.perf_counter())))
            coord = (z, y, x)
            layer._draw(label, last or coord, coord)
            last = coord
        layer._commit_stroke()  # emits events.paint(value=item) → add_stroke
        done: list = []
        emitted.append((time.perf_counter(), done))
        pending.append(done)
        if deadline[0] is None:
            deadline[0] = time.perf_counter() + AUTOSAVE_S
    painted_s = time.perf_counter() - start
    t0 = time.perf_counter()
    session.flush(*data_of(), round=1, merged_round=1)  # what Train did on the GUI thread
    flush_blocks = time.perf_counter() - t0
    for box in pending:
        box.append(time.perf_counter())
    for future in futures:
        future.result()
    session._write = original
    assert isinstance(session, AnnotationSession)
    latency = np.array([done[0] - t for t, done in emitted])
    return {
        "kind": kind,
        "drags": len(emitted),
        "painted_s": round(painted_s, 2),
        "stroke_to_disk_p50_s": round(float(np.median(latency)), 3),
        "stroke_to_disk_max_s": round(float(latency.max()), 3),
        "writer_busy_s": round(busy[0], 2),
        "gui_per_autosave_max_s": round(max(gui_per_save, default=0.0), 4),
        "flush_blocks_s": round(flush_blocks, 3),
        "edits_logged": len(session.project.edits()),
    }


def run_size(size: int, args) -> list[dict]:
    from napari.layers import Labels

    from napari_ssl_seg.annotation import AnnotationSession

    out = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        project = make_project(Path(tmp) / "p.ssl.zarr", size, args.depth)
        session = AnnotationSession(project, background=True)
        shape = project.shape
        annotations = Labels(np.zeros(shape, np.uint16), name="annotations")
        pseudo = Labels(np.zeros(shape, np.uint16), name="pseudo-labels · round 1")
        annotations.events.paint.connect(lambda e: session.add_stroke("annotation", e.value))
        pseudo.events.paint.connect(lambda e: session.add_stroke("correction", e.value))

        def data_of():
            return annotations.data, pseudo.data

        for z, (kind, layer) in enumerate(
            (("annotation", annotations), ("correction", pseudo)), start=1
        ):
            layer.refresh()
            row = paint_slice(session, layer, kind, z, args, data_of)
            row["slice"] = f"{size} x {size}"
            out.append(row)
            print(json.dumps(row), flush=True)
        assert (annotations.data[1] > 0).mean() > 0.9 or args.drags, "the slice was not painted"
        stored = project.human_labels()[0]
        np.testing.assert_array_equal(stored[1][annotations.data[1] > 0], 2)
        np.testing.assert_array_equal(stored[2][pseudo.data[2] > 0], 3)
        session.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,2048", help="slice sizes, comma-separated")
    parser.add_argument("--depth", type=int, default=4, help="slices in the project")
    parser.add_argument("--brush", type=int, default=0, help="brush size (default size/50)")
    parser.add_argument(
        "--drags", type=int, default=None, help="drags per slice (default: cover it)"
    )
    parser.add_argument("--per-row", type=int, default=4, help="drags per brush-wide row")
    parser.add_argument("--drag-seconds", type=float, default=0.2, help="duration of one drag")
    parser.add_argument("--tmp", default=None, help="folder for the projects")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; command: {command_line()}")
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        brush = args.brush
        args.brush = brush or max(4, size // 50)
        rows += run_size(size, args)
        args.brush = brush
    keys = [
        "slice", "kind", "drags", "stroke_to_disk_p50_s", "stroke_to_disk_max_s",
        "writer_busy_s", "gui_per_autosave_max_s", "flush_blocks_s", "edits_logged",
    ]  # fmt: skip
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
