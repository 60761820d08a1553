"""Sliding-window layouts of big slices: time, and agreement with a whole-slice prediction.

Trains one round (default config, ``--variant`` sample, 3 annotated slices, ``--seed``),
mirrors 4 of the sample's prepared (normalised, smoothed) slices out to each of
``--sizes`` pixels square, and predicts them (with the round's background bias) three
ways: whole in one piece (the reference; memory grows with the slice), with MONAI's
windows of 512 overlapping by a quarter (the layout before
:func:`napari_ssl_seg.inference.tile_layout`), and with the fewest windows of at most
512 overlapping by ``TILE_MARGIN`` (the default now). Prints seconds, the share of
voxels labelled as the whole-slice prediction labels them, and Dice against the
mirrored truth. One process, so run it alone:

    python benchmarks/tile_layout.py --sizes 768,1024,2048 --tag laptop2

Writes ``benchmarks/results/tile-layout-<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    command_line,
    load_variant,
    machine_info,
    machine_markdown,
    write_results,
)

#: Slices mirrored out: two near the nuclei's caps, two through their middles.
SLICES = (22, 28, 36, 44)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="768,1024,2048", help="slice sides, comma-separated")
    parser.add_argument("--variant", default="clean", choices=("clean", "noisy"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="local")
    args = parser.parse_args()

    import torch

    from napari_ssl_seg._sample_data import quickstart_slices
    from napari_ssl_seg.config import TrainConfig
    from napari_ssl_seg.data import load_training_set
    from napari_ssl_seg.engine import load_method, run_round
    from napari_ssl_seg.inference import TILE_MARGIN, adjust_background, predict_probabilities
    from napari_ssl_seg.store import Project

    torch.set_num_threads(args.threads)
    image, truth = load_variant(args.variant, args.seed)
    config = TrainConfig(seed=args.seed, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        project = Project.create(Path(tmp) / "p.zarr", image)
        project.annotate_slices(truth, quickstart_slices(3), source="benchmark")
        record = run_round(project, config)
        method, _ = load_method(project)
        prepared = load_training_set(project, config).image
        planes = [np.asarray(prepared[z]) for z in SLICES]
    bias = record["background_bias"]
    layouts = {
        "whole": {"tile": 1 << 30},
        "monai-0.25": {"margin": None},
        f"fewest-{TILE_MARGIN}px": {},
    }
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        pad = (size - planes[0].shape[0]) // 2
        x = torch.from_numpy(np.stack([np.pad(p, pad, mode="symmetric") for p in planes]))
        x = x[:, None].float()
        mirrored = np.stack([np.pad(truth[z], pad, mode="symmetric") for z in SLICES]) > 0
        labels = {}
        for name, options in layouts.items():
            started = time.perf_counter()
            with torch.no_grad():
                probs = [
                    adjust_background(predict_probabilities(method, x[i : i + 1], **options), bias)
                    for i in range(len(x))
                ]
            seconds = time.perf_counter() - started
            labels[name] = torch.cat(probs).argmax(1).numpy() > 0
            dice = 2 * (labels[name] & mirrored).sum() / (labels[name].sum() + mirrored.sum())
            row = {
                "size": size,
                "layout": name,
                "seconds": round(seconds, 2),
                "agreement": round(float(np.mean(labels[name] == labels["whole"])), 6),
                "dice": round(float(dice), 4),
            }
            rows.append(row)
            print(row, flush=True)

    info = machine_info("cpu")
    table = ["| side | layout | seconds (4 slices) | agreement with whole | Dice |"]
    table.append("|---|---|---|---|---|")
    table += [
        f"| {r['size']} | {r['layout']} | {r['seconds']} | {r['agreement']:.5f} | {r['dice']} |"
        for r in rows
    ]
    markdown = "\n".join(
        [
            "# Sliding-window layouts of big slices",
            "",
            machine_markdown(info, command_line()),
            (
                f"Sample {args.variant}, seed {args.seed}, supervised round from 3 slices; "
                f"slices {list(SLICES)} mirrored out; {args.threads} torch threads."
            ),
            "",
            *table,
        ]
    )
    payload = {"machine": info, "arguments": vars(args), "rows": rows}
    for path in write_results("tile-layout", args.tag, payload, markdown):
        print("wrote", path)


if __name__ == "__main__":
    main()
