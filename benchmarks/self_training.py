"""Self-training alone: do rounds on the previous round's pseudo-labels, with no human
correction in between, beat round 1?

The engine's multi-round pseudo-labelling is meant to run with corrections between rounds
(``annotator_curve.py``); this measures what the pseudo-labels alone are worth. For each
variant and seed: ``--slices`` annotated slices, ``--rounds`` rounds at the default
config, Dice of each round on the unannotated slices. Prints one JSON line per
(variant, seed); one process, so run it alone on the machine:

    python benchmarks/self_training.py --slices 3 --rounds 3 --seeds 0,1,2 \\
        > benchmarks/results/self-training-laptop2.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from _common import load_variant, machine_info, unannotated_dice


def main() -> None:
    ints = lambda text: [int(t) for t in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=ints, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="clean,noisy")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig field"
    )
    args = parser.parse_args()

    from napari_ssl_seg._sample_data import quickstart_slices
    from napari_ssl_seg.cli import _parse_value as parse_value
    from napari_ssl_seg.config import TrainConfig
    from napari_ssl_seg.engine import run_round
    from napari_ssl_seg.store import Project

    print(json.dumps({"machine": machine_info("cpu")["cpu"], "arguments": vars(args)}))
    slices = quickstart_slices(args.slices)
    values = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    for variant in args.variants.split(","):
        for seed in args.seeds:
            image, truth = load_variant(variant, seed)
            config = TrainConfig(seed=seed, threads=args.threads, **values)
            dice, seconds, methods = [], [], []
            with tempfile.TemporaryDirectory() as tmp:
                project = Project.create(Path(tmp) / "p.zarr", image)
                project.annotate_slices(truth, slices, source="benchmark")
                for _ in range(args.rounds):
                    record = run_round(project, config)
                    pred = np.asarray(project.pseudo_labels(record["round"])[...])
                    dice.append(round(unannotated_dice(pred, truth, slices), 5))
                    seconds.append(record["seconds"])
                    methods.append(record["method"])
            row = {"variant": variant, "seed": seed, "slices": args.slices, "set": args.set}
            row["methods"] = methods
            print(json.dumps({**row, "dice": dice, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
