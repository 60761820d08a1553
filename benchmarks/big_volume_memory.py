"""Peak memory of predicting a 2048 x 2048 x 256 Zarr volume (target: under 1.5 GB).

Five steps, each in a fresh child process whose peak resident memory (``ru_maxrss``)
is its own:

1. ``baseline``: import torch, MONAI, zarr and our engine, nothing else (the floor every
   step stands on);
2. ``create``: write a uint16 Zarr volume of ``--shape`` (Z, Y, X) slab by slab (the
   nuclei sample mirrored out to that size, so a model trained on it finds nuclei), then
   ``Project.create`` copies it chunk by chunk into a project with slice axis 0
   (2048 x 2048 slices);
3. ``train``: one round (default method and settings) on a small project cut from the
   mirrored sample (16 slices of 512 x 512, 2 of them annotated; ``--annotated 1``: one,
   so the default method "auto" trains mean-teacher), for a checkpoint to predict with;
4. ``predict``: open the big project, load that checkpoint, and predict every slice into
   a new round (``inference.predict_into_round``, as a round does after training). This
   step's peak is the one compared with the target;
5. ``retrain``: annotate two slices of the big project and train round 2 on it (human
   slices + the ``predict`` round's pseudo-labels), as ``train_round`` does, up to its
   first predicted slab. Training reads slices on demand (``load_training_set``), so its
   memory does not grow with the volume either.

    python benchmarks/big_volume_memory.py --workdir /scratch/big --cores 0,1 --tag full

needs about 8 GB of disk in ``--workdir`` (image, pseudo-labels, float32 confidence);
removed at the end unless ``--keep``. Quick check at a small size:

    python benchmarks/big_volume_memory.py --shape 8,1024,1024 --iterations 2 --tag smoke

Writes ``benchmarks/results/big-volume-memory-<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _common import (
    command_line,
    finish_worker,
    machine_info,
    machine_markdown,
    peak_rss_mb,
    pin_to,
    start_worker,
    verdict,
    write_results,
)

TARGET_MB = 1500
SLAB = 8  # slices written at once when making the volume
TRAIN_CROP = (16, 512, 512)
TRAIN_Z0 = 22  # sample slices 22..37 hold many nuclei (slice 10, say, holds none)


# ------------------------------------------------------------------- the test volume
def mirrored_sample(z0: int, z1: int, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``z0:z1`` of the nuclei sample mirrored out to ``shape``: image and truth.

    Returns
    -------
    image : (z1 - z0, Y, X) uint16 ndarray
    truth : (z1 - z0, Y, X) uint8 ndarray (1 = nucleus)
    """
    image, truth = _sample()
    source = _source_slices(np.arange(z0, z1))
    pad = ((0, 0), (0, shape[1] - image.shape[1]), (0, shape[2] - image.shape[2]))
    grow = lambda a: np.pad(a[source], [(0, max(0, p)) for _, p in pad], mode="symmetric")  # noqa: E731
    return grow(image)[:, : shape[1], : shape[2]], grow(truth)[:, : shape[1], : shape[2]]


def _source_slices(z: np.ndarray) -> np.ndarray:
    """The sample slice shown at volume slice ``z``: 0..59, 59..0, 0..59, ..."""
    depth = _sample()[0].shape[0]
    z = np.asarray(z) % (2 * depth)
    return np.where(z < depth, z, 2 * depth - 1 - z)


def check_slices(n_slices: int, count: int = 3) -> list[int]:
    """Up to ``count`` volume slices, spread out, whose truth holds nuclei."""
    truth = _sample()[1]
    full = np.flatnonzero(truth.any(axis=(1, 2))[_source_slices(np.arange(n_slices))])
    # One volume slice per sample slice: a deep volume shows each sample slice many
    # times, and spreading over all of them picked slice 17 three times at 256 slices.
    _, first = np.unique(_source_slices(full), return_index=True)
    full = np.sort(full[first])
    if full.size == 0:
        return []
    return sorted({int(full[i]) for i in np.linspace(0, full.size - 1, count).round().astype(int)})


def annotate_from_truth(project) -> list[int]:
    """Annotate two slices of a slice-axis-0 project of the mirrored sample from its truth.

    Slices with nuclei where the volume has some (a small one may hold only background);
    returns them.
    """
    shape = project.shape
    annotated = check_slices(shape[0], count=2) or [0, shape[0] // 2]
    for z in annotated:
        truth = mirrored_sample(z, z + 1, shape)[1]
        region = (slice(z, z + 1), slice(0, shape[1]), slice(0, shape[2]))
        project.apply_edit("annotation", region, truth, source="benchmark", whole_slices=True)
    return annotated


@functools.cache
def _sample() -> tuple[np.ndarray, np.ndarray]:
    from napari_ssl_seg._sample_data import load_nuclei

    image, truth, _ = load_nuclei()
    return image, truth


def write_volume(path: Path, shape: Sequence[int]):
    """A uint16 Zarr array of ``shape`` on disk, chunked (1, 512, 512), written by slabs."""
    import zarr

    array = zarr.create_array(
        store=str(path),
        shape=tuple(shape),
        dtype=np.uint16,
        chunks=(1, min(512, shape[1]), min(512, shape[2])),
        overwrite=True,
    )
    for z0 in range(0, shape[0], SLAB):
        z1 = min(z0 + SLAB, shape[0])
        array[z0:z1] = mirrored_sample(z0, z1, shape)[0]
    return array


# ------------------------------------------------------------------ steps (children)
def step_baseline(job: dict) -> dict:
    """Import what the other steps import, and nothing more."""
    import monai  # noqa: F401
    import torch  # noqa: F401
    import zarr  # noqa: F401

    import napari_ssl_seg.engine  # noqa: F401
    import napari_ssl_seg.inference  # noqa: F401

    return {}


def step_create(job: dict) -> dict:
    """Write the volume slab by slab, then make a project of it (copied chunk by chunk)."""
    from napari_ssl_seg.store import Project

    workdir, shape = Path(job["workdir"]), job["shape"]
    t0 = time.perf_counter()
    source = write_volume(workdir / "source.zarr", shape)
    t1 = time.perf_counter()
    Project.create(workdir / "big.zarr", source, axis=0, source="mirrored nuclei sample")
    t2 = time.perf_counter()
    shutil.rmtree(workdir / "source.zarr")
    return {"write_seconds": round(t1 - t0, 1), "project_create_seconds": round(t2 - t1, 1)}


def step_train(job: dict) -> dict:
    """One round on a small project, for a checkpoint to predict with."""
    from napari_ssl_seg.config import TrainConfig
    from napari_ssl_seg.engine import run_round
    from napari_ssl_seg.store import Project

    # Cut from the same mirrored sample as the big volume, where it holds many nuclei.
    workdir, crop = Path(job["workdir"]), TRAIN_CROP
    image, truth = mirrored_sample(TRAIN_Z0, TRAIN_Z0 + crop[0], crop)
    project = Project.create(workdir / "train.zarr", image, overwrite=True)
    annotated = [crop[0] // 4, (3 * crop[0]) // 4][: job["annotated"]]
    project.annotate_slices(truth, annotated, source="benchmark")
    values = {"iterations": job["iterations"]} if job["iterations"] else {}
    config = TrainConfig(
        device=job["device"], threads=job["threads"], mode=job.get("mode", "2d"), **values
    )
    record = run_round(project, config)
    return {
        "method": record["method"],
        "iterations": record["iterations_done"],
        "train_crop": crop,
        "annotated": annotated,
        "round_seconds": record["seconds"],
        "checkpoint": str(project.checkpoint_path(record["round"])),
    }


def step_predict(job: dict) -> dict:
    """Predict the big project with the checkpoint into a new round: the measured step."""
    import torch

    from napari_ssl_seg.config import TrainConfig
    from napari_ssl_seg.engine import build_method, load_checkpoint, pick_device
    from napari_ssl_seg.inference import rank_slices
    from napari_ssl_seg.metrics import dice
    from napari_ssl_seg.store import Project

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    checkpoint = Path(job["checkpoint"])
    ckpt = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(ckpt["config"])
    method = build_method(config, num_classes=int(ckpt["num_classes"]))
    method.load_state_dict(ckpt["weights"])
    device = pick_device(job["device"])
    method.to(device)
    started = time.perf_counter()
    project = Project.open(Path(job["workdir"]) / "big.zarr", verify=False)
    # The training intensity range, as when a model is applied to a new volume. (A round
    # on this volume would use normalisation(project.image), which reads a strided sample
    # of whole slices: at 256 x 2048 x 2048 that is slice 0 alone.)
    norm = tuple(ckpt["norm"])
    writer = project.begin_round()
    scores, rss = predict_tracking_memory(
        project, method, writer, norm, config, device, ckpt.get("background_bias", 0.0)
    )
    seconds = time.perf_counter() - started
    record = {
        "method": config.method,
        "config": config.to_dict(),
        "norm": list(norm),
        "uncertain_slices": rank_slices(scores),
        "seconds": round(seconds, 2),
        "source": f"benchmark: predicted with {checkpoint}",
    }
    writer.commit(record, checkpoint.read_bytes())
    check = check_slices(project.shape[0])  # a sanity check: are nuclei found at all?
    score = None
    if check:
        truth = np.concatenate([mirrored_sample(z, z + 1, project.shape)[1] for z in check])
        pred = np.asarray(project.pseudo_labels(writer.round).get_orthogonal_selection((check,)))
        score = round(dice(pred, truth), 4)
    return {
        "predict_seconds": round(seconds, 1),
        "seconds_per_slice": round(seconds / project.shape[0], 2),
        "rss_mb_per_slab": rss,
        "dice_on_slices": check,
        "dice": score,
        "torch_threads": torch.get_num_threads(),
    }


def step_retrain(job: dict) -> dict:
    """Train round 2 on the big project itself (human slices + round 1's pseudo-labels).

    Two slices are annotated from the mirrored truth; the round runs as the engine runs
    it (``train_round``: load, train, calibrate) and is abandoned at its first prediction
    report, so this step's peak is that of training on the big volume, not of predicting
    it again (the ``predict`` step measures that).
    """
    from napari_ssl_seg.config import TrainConfig
    from napari_ssl_seg.engine import train_round
    from napari_ssl_seg.store import Project

    project = Project.open(Path(job["workdir"]) / "big.zarr", verify=False)
    # Slices with nuclei where the volume has some (a small one may hold only background).
    annotated = annotate_from_truth(project)
    values = {"iterations": job["iterations"]} if job["iterations"] else {}
    config = TrainConfig(
        method="supervised",
        device=job["device"],
        threads=job["threads"],
        mode=job.get("mode", "2d"),
        **values,
    )
    started = time.perf_counter()
    phases: dict[str, float] = {}
    gen = train_round(project, config)
    for report in gen:
        phases.setdefault(report["phase"], round(time.perf_counter() - started, 1))
        if report["phase"] == "train" and report["iteration"] == report["total"]:
            trained_peak_mb = round(peak_rss_mb(), 1)
        if report["phase"] == "predict":
            gen.close()
            break
    return {
        "annotated": annotated,
        "pseudo_labels_from_round": project.latest_round,
        "iterations": config.iterations,
        "phase_started_s": phases,
        "peak_mb_after_training": trained_peak_mb,
    }


def predict_tracking_memory(project, method, writer, norm, config, device, background_bias):
    """Run ``predict_into_round`` as a round does (background bias, smoothing and majority
    vote included; the last two recomputed for this volume's voxel size); return its
    slice scores and the resident MB per slab."""
    from napari_ssl_seg.data import smoothing_sigmas
    from napari_ssl_seg.engine import vote_window
    from napari_ssl_seg.inference import predict_into_round

    rss, started = [], time.perf_counter()
    gen = predict_into_round(
        project,
        method,
        writer,
        norm=norm,
        mode=config.mode,
        device=device,
        background_bias=background_bias,
        vote_window=vote_window(config.vote, project),
        smoothing=smoothing_sigmas(config.smoothing, project),
    )
    while True:
        try:
            report = next(gen)
        except StopIteration as finished:
            return finished.value, rss
        rss.append(round(current_rss_mb(), 1))
        print(
            f"predict {report['iteration']}/{report['total']} "
            f"{time.perf_counter() - started:.0f} s, resident {rss[-1]:.0f} MB",
            file=sys.stderr,
            flush=True,
        )


def current_rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


STEPS = {
    "baseline": step_baseline,
    "create": step_create,
    "train": step_train,
    "predict": step_predict,
    "retrain": step_retrain,
}


def run_step(name: str, job: dict, cores: str | None) -> dict:
    """Run one step in a fresh process (its stderr shown live); return its JSON result."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps({**job, "step": name}),
    ]
    if cores:
        cmd += ["--cores", cores]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"step {name} failed with exit status {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - t0, 1)
    print(
        f"{name:9s} peak {result['peak_mb']:7.0f} MB  {result['process_seconds']:7.1f} s  "
        + json.dumps(
            {
                k: v
                for k, v in result.items()
                if k not in ("peak_mb", "process_seconds", "rss_mb_per_slab", "step")
            }
        ),
        flush=True,
    )
    return result


# ------------------------------------------------------------------------------- main
def report(steps: dict, args, info: dict) -> str:
    p = steps["predict"]
    shape = " x ".join(map(str, args.shape))
    rows = ["| step | peak MB | seconds |", "|---|---|---|"] + [
        f"| {name} | {r['peak_mb']:.0f} | {r['process_seconds']:.1f} |"
        for name, r in steps.items()
    ]
    train, gib = steps["train"], np.prod(args.shape) * 2 / 2**30
    setup = (
        f"Volume (Z, Y, X) = {shape} uint16 ({gib:.2f} GiB), slice axis 0; model: "
        f"{train['method']} ({args.mode}) after {train['iterations']} iterations on a "
        f"{' x '.join(map(str, train['train_crop']))} crop; {p['torch_threads']} torch threads. "
        "Peak MB is each step's process maximum resident memory; baseline = imports only.\n"
    )
    rss = p["rss_mb_per_slab"]
    prediction = (
        f"\nPrediction: {p['predict_seconds']:.0f} s ({p['seconds_per_slice']:.2f} s per slice), "
        f"resident memory after each slab {min(rss):.0f}-{max(rss):.0f} MB, Dice "
        f"{p['dice'] if p['dice'] is not None else '-'} on slices {p['dice_on_slices']} (a "
        "sanity check that the model finds the nuclei).\n"
    )
    ok = verdict(p["peak_mb"] < TARGET_MB) if tuple(args.shape) == (256, 2048, 2048) else "n/a"
    target = f"- {ok}: predicting {shape} peaks at {p['peak_mb']:.0f} MB (< {TARGET_MB} MB)"
    t = steps["retrain"]
    retrain = (
        f"\nRetrain: round 2 on the big project itself, `supervised`, {t['iterations']} "
        f"iterations, human slices {t['annotated']} + round {t['pseudo_labels_from_round']}'s "
        f"pseudo-labels; phases started at {t['phase_started_s']} s. Peak after the "
        f"training iterations {t['peak_mb_after_training']:.0f} MB; with the calibration "
        f"and the first predicted slab {t['peak_mb']:.0f} MB.\n"
    )
    title = "# Peak memory of predicting a large Zarr volume\n"
    return "\n".join(
        [title, machine_markdown(info, command_line()), setup, *rows, prediction, retrain, target]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape",
        type=lambda t: [int(s) for s in t.split(",")],
        default=[256, 2048, 2048],
        help="Z,Y,X of the volume (default 256,2048,2048)",
    )
    parser.add_argument(
        "--iterations", type=int, help="of the training round (default: TrainConfig's)"
    )
    parser.add_argument(
        "--annotated",
        type=int,
        choices=(1, 2),
        default=2,
        help="annotated slices of the training round (1: auto trains mean-teacher)",
    )
    parser.add_argument(
        "--mode",
        choices=("2d", "2.5d", "3d"),
        default="2d",
        help="TrainConfig.mode of both rounds",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--cores", help="pin every step to these cores, e.g. 0,1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, help="where the volumes go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the volumes")
    parser.add_argument("--tag", default="local")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = start_worker(args)
        finish_worker({"step": job["step"], **STEPS[job["step"]](job)})
        return 0
    if len(args.shape) != 3 or min(args.shape) < 1 or min(args.shape[1:]) < 256:
        parser.error(f"--shape must be 3 positive sizes Z,Y,X with Y, X >= 256, got {args.shape}")
    pin_to([int(c) for c in args.cores.split(",")] if args.cores else [], args.threads)
    info = machine_info(args.device)
    print(machine_markdown(info, command_line()))
    workdir = Path(tempfile.mkdtemp(prefix="big-volume-", dir=args.workdir))
    job = {
        "workdir": str(workdir),
        "shape": args.shape,
        "iterations": args.iterations,
        "annotated": args.annotated,
        "mode": args.mode,
        "threads": args.threads,
        "device": args.device,
    }
    try:
        steps = {name: run_step(name, job, args.cores) for name in ("baseline", "create", "train")}
        steps["predict"] = run_step(
            "predict", {**job, "checkpoint": steps["train"]["checkpoint"]}, args.cores
        )
        steps["retrain"] = run_step("retrain", job, args.cores)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    markdown = report(steps, args, info)
    payload = {
        "command": command_line(),
        "machine": info,
        "target_mb": TARGET_MB,
        "arguments": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "cores")
        }
        | {"cores": args.cores},
        "steps": steps,
        "peak_rss_mb_parent": round(peak_rss_mb(), 1),
    }
    paths = write_results("big-volume-memory", args.tag, payload, markdown)
    print("\n" + markdown)
    print("wrote " + ", ".join(map(str, paths)) + ("" if not args.keep else f"\nkept {workdir}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
