"""What averaging networks would buy: Dice of saved probability volumes, alone and averaged.

Reads (Z, K, H, W) probability volumes saved by ``tune_defaults.py --save-probs`` (one
per seed, background bias already applied), and prints the voted Dice on the unannotated
slices of each, of the mean of every pair, and of the mean of all. An ensemble of two
networks costs two predictions per round; this says whether it is worth it before any
engine code is written::

    for s in 0 1 2 3 4 5; do
      python benchmarks/tune_defaults.py --method supervised --iterations 90 \\
          --eval-every 90 --seed $s --save-probs /tmp/c90_s$s.npy
    done
    python benchmarks/ensemble_probs.py --slices 3 /tmp/c90_s*.npy

Use files predicted from the same image: ``tune_defaults.py --noisy`` draws the noise
with ``--seed``, so averaging noisy runs of different seeds averages two noise draws
of the volume (which a user never has) and overstates the gain.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probs", nargs="+", help=".npy files of (Z, K, H, W) probabilities")
    parser.add_argument("--slices", type=int, default=3, help="annotated slices (excluded)")
    parser.add_argument("--vote", type=int, default=5, help="majority-vote width (1 = off)")
    args = parser.parse_args(argv)

    from napari_ssl_seg._sample_data import load_nuclei, quickstart_slices
    from napari_ssl_seg.inference import vote_volume
    from napari_ssl_seg.metrics import dice

    _, truth, _ = load_nuclei()
    annotated = set(quickstart_slices(args.slices))
    scored = [z for z in range(truth.shape[0]) if z not in annotated]
    volumes = [np.load(path) for path in args.probs]  # read once; every pair reuses them

    def score(probs: np.ndarray) -> float:
        labels = probs.argmax(1).astype(np.uint16)
        labels = vote_volume(labels, (args.vote,) * 3, num_classes=probs.shape[1])
        return round(dice(labels[scored], truth[scored]), 4)

    alone = [score(v) for v in volumes]
    pairs = {
        f"{a},{b}": score((volumes[a] + volumes[b]) / 2)
        for a, b in itertools.combinations(range(len(volumes)), 2)
    }
    result = {
        "files": args.probs,
        "alone": alone,
        "alone_mean": round(float(np.mean(alone)), 4),
        "pairs": pairs,
        "pairs_mean": round(float(np.mean(list(pairs.values()))), 4) if pairs else None,
        "all": score(sum(volumes) / len(volumes)),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
