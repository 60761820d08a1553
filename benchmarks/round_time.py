"""The timing target: a whole round through the CLI against the random forest, side by side.

On the nuclei sample with the 3 quick-start annotated slices (10, 30, 50), one after the
other on the same cores:

- the ilastik-style random forest (``baselines.py``): normalise, features, fit and
  predict every slice, in this process (the time of the work only: no start-up, no file
  reading, which makes the comparison stricter for us);
- a whole round through the command line, each step a fresh process, timed end to end::

      napari-ssl-seg init P --image nuclei.tif --labels nuclei_annotations_3slices.tif \\
          --annotated-slices 10,30,50
      napari-ssl-seg train P --device cpu --threads 2 --seed S --quiet
      napari-ssl-seg export P --out labels.tif

with the default method and settings. Both are scored by Dice on the 57 unannotated
slices. The ``noisy`` variant writes ``noisy_nuclei(seed)`` to a temporary TIFF first.
Target (issue #3): the CLI round in at most 4x the random forest's time. For laptop-like
figures on a bigger machine, pin to 2 cores:

    python benchmarks/round_time.py --cores 0,1 --seeds 0,1,2 --tag full

Writes ``benchmarks/results/round-time-<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _common import (
    add_variants_argument,
    command_line,
    load_variant,
    machine_info,
    machine_markdown,
    mean_std,
    pin_to,
    unannotated_dice,
    verdict,
    write_results,
)

ANNOTATED = [10, 30, 50]  # the slices labelled in nuclei_annotations_3slices.tif


def cli_command() -> list[str]:
    """The installed ``napari-ssl-seg`` beside this Python, else ``python -m``."""
    script = Path(sys.executable).with_name("napari-ssl-seg")
    found = str(script) if script.exists() else shutil.which("napari-ssl-seg")
    return [found] if found else [sys.executable, "-m", "napari_ssl_seg.cli"]


def time_cli_round(
    image_path: Path,
    workdir: Path,
    *,
    seed: int,
    threads: int,
    device: str,
    iterations: int | None,
) -> dict:
    """Run init, train and export as separate processes; seconds of each and the labels."""
    from napari_ssl_seg._sample_data import NUCLEI_ANNOTATIONS
    from napari_ssl_seg.io import read_volume

    cli, project, out = cli_command(), workdir / "round.zarr", workdir / "labels.tif"
    labels = ["--labels", str(NUCLEI_ANNOTATIONS), "--annotated-slices", "10,30,50"]
    train = ["--device", device, "--threads", str(threads), "--seed", str(seed), "--quiet"]
    train += ["--iterations", str(iterations)] if iterations else []
    steps = {
        "init": ["init", str(project), "--image", str(image_path), *labels, "--overwrite"],
        "train": ["train", str(project), *train],
        "export": ["export", str(project), "--out", str(out), "--overwrite"],
    }
    seconds = {}
    for name, arguments in steps.items():
        t0 = time.perf_counter()
        proc = subprocess.run([*cli, *arguments], capture_output=True, text=True)
        seconds[name] = round(time.perf_counter() - t0, 2)
        if proc.returncode != 0:
            raise RuntimeError(
                f"napari-ssl-seg {name} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
    seconds["total"] = round(sum(seconds.values()), 2)
    return {"seconds": seconds, "labels": read_volume(out).data}


def measure(variant: str, seed: int, workdir: Path, args) -> dict:
    """The random forest, then the CLI round, on one variant and seed."""
    import tifffile
    from baselines import random_forest_segment

    from napari_ssl_seg._sample_data import NUCLEI_IMAGE

    image, truth = load_variant(variant, seed)
    image_path = NUCLEI_IMAGE
    if variant == "noisy":
        image_path = workdir / f"noisy-{seed}.tif"
        tifffile.imwrite(image_path, image)
    rf, rf_seconds = random_forest_segment(image, truth, ANNOTATED, n_jobs=args.threads, seed=seed)
    cli = time_cli_round(
        image_path,
        workdir,
        seed=seed,
        threads=args.threads,
        device=args.device,
        iterations=args.iterations,
    )
    return {
        "variant": variant,
        "seed": seed,
        "rf_seconds": round(rf_seconds, 2),
        "rf_dice": round(unannotated_dice(rf, truth, ANNOTATED), 5),
        "cli_seconds": cli["seconds"],
        "cli_dice": round(unannotated_dice(cli["labels"], truth, ANNOTATED), 5),
        "ratio": round(cli["seconds"]["total"] / rf_seconds, 2),
    }


def report(results: list[dict], args, info: dict, method: str) -> str:
    head = [
        "variant",
        "seed",
        "RF s",
        "RF Dice",
        "CLI init s",
        "train s",
        "export s",
        "CLI total s",
        "ratio",
        "CLI Dice",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r["cli_seconds"]
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['rf_seconds']:.1f} | {r['rf_dice']:.4f} | "
            f"{s['init']:.1f} | {s['train']:.1f} | {s['export']:.1f} | {s['total']:.1f} | "
            f"{r['ratio']:.2f} | {r['cli_dice']:.4f} |"
        )
    targets = []
    for v in args.variants:
        rows = [r for r in results if r["variant"] == v]
        ratio = float(np.mean([r["ratio"] for r in rows]))
        cli, rf = (float(np.mean([r[k] for r in rows])) for k in ("cli_dice", "rf_dice"))
        ok = verdict(ratio <= 4) if v == "clean" else "info"  # the target is on the sample
        targets.append(
            f"{ok}: {v}: the CLI round takes {ratio:.2f}x the random forest's time (<= 4x)"
        )
        if v == "clean":
            targets.append(f"{verdict(cli >= 0.97)}: clean: CLI round Dice {cli:.4f} >= 0.97")
        else:
            targets.append(
                f"{verdict(cli - rf >= 0.02)}: noisy: CLI round Dice {cli:.4f} vs random "
                f"forest {rf:.4f}: {100 * (cli - rf):+.1f} points >= +2"
            )
    summary = []
    for v in args.variants:
        rf = mean_std([r["rf_seconds"] for r in results if r["variant"] == v], 1)
        cli = mean_std([r["cli_seconds"]["total"] for r in results if r["variant"] == v], 1)
        summary.append(f"| {v} | {rf} s | {cli} s |")
    pinned = f", pinned to cores {args.cores}" if args.cores else ""
    setup = (
        f"Default method ({method}), {args.iterations or 'default'} iterations, "
        f"{args.threads} threads for both{pinned}; 3 annotated slices (10, 30, 50), Dice on "
        "the other 57.\n"
    )
    return (
        "\n".join(
            [
                "# Round time: the CLI round against the random forest\n",
                machine_markdown(info, command_line()),
                setup,
                *lines,
                "",
                "| variant | random forest | CLI round |",
                "|---|---|---|",
                *summary,
                "\nTargets (issue #3):\n",
                *[f"- {t}" for t in targets],
            ]
        )
        + "\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_variants_argument(parser)
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")], default=[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads and RF jobs")
    parser.add_argument(
        "--cores", help="pin this process and its children to these cores, e.g. 0,1"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iterations", type=int, help="default: TrainConfig's")
    parser.add_argument("--tag", default="local")
    args = parser.parse_args(argv)
    pin_to([int(c) for c in args.cores.split(",")] if args.cores else [], args.threads)

    from napari_ssl_seg.config import TrainConfig

    info = machine_info(args.device)
    print(machine_markdown(info, command_line()))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            for seed in args.seeds:
                r = measure(variant, seed, Path(tmp), args)
                results.append(r)
                print(
                    f"{variant} seed {seed}: random forest {r['rf_seconds']:.1f} s Dice "
                    f"{r['rf_dice']:.4f} | CLI round {r['cli_seconds']['total']:.1f} s "
                    f"({r['ratio']:.2f}x) Dice {r['cli_dice']:.4f}",
                    flush=True,
                )
    markdown = report(results, args, info, TrainConfig().method)
    payload = {
        "command": command_line(),
        "machine": info,
        "arguments": vars(args),
        "cli": cli_command(),
        "results": results,
    }
    paths = write_results("round-time", args.tag, payload, markdown)
    print("\n" + markdown)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
