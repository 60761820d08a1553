"""Peak memory of a retrain round on a large project, per phase of ``train_round``.

The ``retrain`` step of ``big_volume_memory.py`` needs a predicted round 1 first (about
7 s per 2048^2 slice on 2 cores, half an hour at 256 slices). This script writes round 1
directly instead: its pseudo-labels are the mirrored sample's truth, its confidences
0.97 on background and 0.8 on nuclei (so the class-balanced selection has work to do).
Then two slices are annotated and round 2 runs as the engine runs it (load the training
set, train, calibrate) up to its first predicted slab. A thread samples the resident
memory every few milliseconds and keeps the peak of each phase.

    python benchmarks/retrain_memory.py --shape 256,2048,2048 --cores 0,1 --tag laptop2

needs about 6 GB of disk (``--workdir``, removed at the end). Writes
``benchmarks/results/retrain-memory-<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _common import command_line, machine_info, machine_markdown, pin_to, write_results
from big_volume_memory import SLAB, annotate_from_truth, mirrored_sample, write_volume
from big_volume_memory import current_rss_mb as resident_mb


class PhasePeaks:
    """Resident-memory peak per phase, sampled by a daemon thread."""

    def __init__(self, interval_s: float = 0.003) -> None:
        self.phase = "setup"
        self.peaks: dict[str, float] = {}
        self._interval = interval_s
        threading.Thread(target=self._run, daemon=True, name="phase peaks").start()

    def _run(self) -> None:
        while True:
            mb, phase = resident_mb(), self.phase
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), mb)
            time.sleep(self._interval)


def make_project(workdir: Path, shape: Sequence[int]):
    """The big project with round 1 written from the truth and 2 annotated slices."""
    from napari_ssl_seg.config import TrainConfig
    from napari_ssl_seg.store import Project

    project = Project.create(workdir / "big.zarr", write_volume(workdir / "image.zarr", shape))
    writer = project.begin_round()
    for z0 in range(0, shape[0], SLAB):
        z1 = min(z0 + SLAB, shape[0])
        truth = mirrored_sample(z0, z1, shape)[1].astype(np.uint16)
        confidence = np.where(truth > 0, 0.8, 0.97).astype(np.float32)
        writer.write((slice(z0, z1), slice(None), slice(None)), truth, confidence)
    record = {
        "method": "supervised",
        "config": TrainConfig(method="supervised").to_dict(),
        "norm": [0.0, 1.0],
        "uncertain_slices": [],
        "seconds": 0.0,
        "source": "benchmark: round 1 written from the mirrored truth",
    }
    writer.commit(record, b"no weights: written by benchmarks/retrain_memory.py")
    return project, annotate_from_truth(project)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="256,2048,2048", help="Z,Y,X")
    parser.add_argument("--iterations", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument("--mode", choices=("2d", "2.5d", "3d"), default="2d")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cores", default=None, help="pin to these cores, e.g. 0,1")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--tag", default="local")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 3 or min(shape) < 1:
        parser.error(f"--shape needs three positive sizes Z,Y,X, got {args.shape!r}")
    cores = [int(c) for c in args.cores.split(",")] if args.cores else []
    pin_to(cores, args.threads)

    import torch

    from napari_ssl_seg.config import TrainConfig
    from napari_ssl_seg.engine import train_round

    torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    peaks = PhasePeaks()
    workdir = Path(tempfile.mkdtemp(prefix="retrain-memory-", dir=args.workdir))
    try:
        project, annotated = make_project(workdir, shape)
        values = {"iterations": args.iterations} if args.iterations else {}
        config = TrainConfig(method="supervised", threads=args.threads, mode=args.mode, **values)
        started, phase_started, last_report = time.perf_counter(), {}, {}
        gen = train_round(project, config)
        for report in gen:
            peaks.phase = report["phase"]
            now = round(time.perf_counter() - started, 1)
            phase_started.setdefault(report["phase"], now)
            last_report[report["phase"]] = now
            if report["phase"] == "predict":
                gen.close()
                break
        peaks.phase = "end"
        time.sleep(0.05)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "command": command_line(),
        "machine": info,
        "arguments": vars(args),
        "annotated": annotated,
        "iterations": config.iterations,
        "phase_started_s": phase_started,
        # The last iteration's report; the "train" phase then goes on through the
        # calibration and the first predicted slab, until the first "predict" report.
        "last_iteration_s": last_report.get("train"),
        "phase_peak_mb": {k: round(v, 1) for k, v in peaks.peaks.items() if k != "end"},
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
    }
    rows = "\n".join(f"| {k} | {v:.0f} |" for k, v in result["phase_peak_mb"].items())
    markdown = (
        "# Peak memory of a retrain round on a large project\n\n"
        + machine_markdown(info, result["command"])
        + f"\nVolume (Z, Y, X) = {' x '.join(map(str, shape))}, slice axis 0; round 1 "
        f"written from the truth, human slices {annotated}; `supervised` ({args.mode}), "
        f"{config.iterations} iterations, {args.threads} torch threads. Phases started at "
        f"{phase_started} s (setup = making the project); the last iteration ended at "
        f"{result['last_iteration_s']} s (calibration and the first predicted slab "
        "follow within the train phase).\n\n"
        "| phase | peak resident MB |\n|---|---|\n"
        + rows
        + f"\n\nProcess maximum (ru_maxrss): {result['ru_maxrss_mb']:.0f} MB.\n"
    )
    paths = write_results("retrain-memory", args.tag, result, markdown)
    print(markdown)
    print("wrote", *paths, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
