"""The whole annotation loop on the bundled nuclei sample, headless.

Round 1 learns from the 3 quick-start slices; a simulated annotator then corrects the
2 least confident slices (copying the sample's ground truth, as a person would paint
it); round 2 learns from annotations + corrections + round 1's confident
pseudo-labels; the merged labels are exported. Dice is printed per round on the slices
no human touched in either round, so the two rounds are scored on the same voxels.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from napari_ssl_seg._sample_data import load_nuclei, quickstart_slices
from napari_ssl_seg.cli import ProgressPrinter
from napari_ssl_seg.config import TrainConfig
from napari_ssl_seg.engine import run_round
from napari_ssl_seg.io import check_output_path, write_labels
from napari_ssl_seg.metrics import dice
from napari_ssl_seg.store import Project


def run_demo(
    project_path: Path,
    *,
    iterations: int | None = None,
    method: str | None = None,
    out: Path | None = None,
    seed: int = 0,
    corrections_per_round: int = 2,
    overwrite: bool = False,
    stream: TextIO = sys.stdout,
) -> dict:
    """Run init, round 1, simulated corrections, round 2 and export; return the scores.

    ``project_path`` and ``out`` are replaced only with ``overwrite`` (a project only if
    it is a napari-ssl-seg project); both are checked before any work.
    """
    started = time.time()
    if out is not None:
        check_output_path(out, overwrite=overwrite)
    image, truth, voxel_size = load_nuclei()
    annotated = quickstart_slices(3)
    project = Project.create(
        project_path,
        image,
        voxel_size=voxel_size,
        source="bundled nuclei sample",
        labels=truth,
        annotated_slices=annotated,
        edit_source="demo",
        overwrite=overwrite,
    )
    print(
        f"project {project.path}: {image.shape} nuclei, annotated slices {annotated}", file=stream
    )
    values = {"seed": seed}
    if iterations is not None:
        values["iterations"] = iterations
    if method is not None:
        values["method"] = method
    config = TrainConfig(**values)
    printer = ProgressPrinter()

    record1 = run_round(project, config, progress=printer)
    ranked = [s["slice"] for s in record1["uncertain_slices"]]
    corrected = ranked[:corrections_per_round]
    project.correct_slices(truth, corrected, source="demo: simulated annotator")
    record2 = run_round(project, config, progress=printer)

    scored = [i for i in range(truth.shape[0]) if i not in set(annotated) | set(corrected)]
    scores = {}
    for record in (record1, record2):
        r = record["round"]
        pred = np.asarray(project.pseudo_labels(r)[...])
        scores[r] = dice(pred[scored], truth[scored])
        print(
            f"round {r} ({record['method']}, {record['iterations_done']} iterations, "
            f"{record['seconds']:.0f} s): Dice {scores[r]:.4f} on {len(scored)} untouched slices",
            file=stream,
        )
    print(f"corrected slices (least confident after round 1): {corrected}", file=stream)
    if out is not None:
        project.refresh_final()
        path = write_labels(
            out, project.final[...], voxel_size=project.voxel_size, overwrite=overwrite
        )
        print(f"exported merged labels to {path}", file=stream)
    print(f"total {time.time() - started:.0f} s", file=stream)
    return {"dice": scores, "corrected": corrected, "annotated": annotated}


def open_in_napari(project_path: Path | None = None) -> int:
    """Open napari with the sample and the annotation widget docked (needs a display)."""
    import napari

    viewer = napari.Viewer(title="napari-ssl-seg demo")
    viewer.open_sample("napari-ssl-seg", "nuclei")
    viewer.window.add_plugin_dock_widget("napari-ssl-seg", "SSL Seg: annotate and train")
    napari.run()
    return 0
