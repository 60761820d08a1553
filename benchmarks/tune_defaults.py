"""Learning curves (Dice on the unannotated slices against wall time) for config choices.

Trains one configuration on the bundled nuclei sample with N annotated slices and prints,
every ``--eval-every`` iterations, the Dice of the whole-volume prediction on the slices
no human labelled (raw argmax, after the background calibration, and after the majority
vote as a round writes it), with the training seconds so far (evaluation time excluded).

    python benchmarks/tune_defaults.py --method supervised --iterations 400 \
        --set features=8,16,32,64,128,8 --set norm=instance --noisy

Used to choose TrainConfig's defaults; run several pinned to 2 cores each
(``taskset -c 0,1``) for laptop-like figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from napari_ssl_seg.cli import _parse_value as parse_value
from napari_ssl_seg.config import TrainConfig
from napari_ssl_seg.data import TwoStreamSampler, load_training_set, slice_stack
from napari_ssl_seg.engine import (
    build_method,
    calibrate_after_training,
    clip_gradients,
    seed_everything,
    vote_window,
)
from napari_ssl_seg.inference import adjust_background, predict_probabilities, vote_volume
from napari_ssl_seg.metrics import dice
from napari_ssl_seg.store import Project


def load_sample(noisy: bool, seed: int = 0):
    from napari_ssl_seg import _sample_data as sd

    image, truth, voxel_size = sd.load_nuclei()
    if noisy:
        image = sd.noisy_nuclei(seed=seed)
    return image, truth, voxel_size


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="supervised")
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--slices", type=int, default=3, help="annotated slices (evenly spaced)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noisy", action="store_true")
    parser.add_argument(
        "--voxel-size",
        action="store_true",
        help="give the project the sample's voxel size (as the demo does; smoothing and "
        "vote then scale across slices)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-recalibrate", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="TrainConfig key=value")
    parser.add_argument("--setting", action="append", default=[], help="method setting key=value")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument(
        "--save-probs", help="save the last evaluation's (Z, K, H, W) probabilities (.npy)"
    )
    args = parser.parse_args(argv)

    from napari_ssl_seg._sample_data import quickstart_slices

    torch.set_num_threads(args.threads)
    image, truth, voxel_size = load_sample(args.noisy, args.seed)
    slices = quickstart_slices(args.slices)
    values = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    settings = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.setting)}
    config = TrainConfig(
        method=args.method,
        iterations=args.iterations,
        seed=args.seed,
        threads=args.threads,
        settings=settings,
        **values,
    )
    seed_everything(config.seed)
    tmp = tempfile.TemporaryDirectory()  # the training set reads slices from the project
    project = Project.create(
        f"{tmp.name}/p.zarr", image, voxel_size=voxel_size if args.voxel_size else None
    )
    project.annotate_slices(truth, slices)
    data = load_training_set(project, config)
    device = torch.device(args.device)
    method = build_method(config, num_classes=data.num_classes).to(device)
    sampler = TwoStreamSampler(data, config)
    params = [p for p in method.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimiser, config.iterations, power=0.9)
    unannotated = [i for i in range(truth.shape[0]) if i not in slices]
    x_all = torch.from_numpy(slice_stack(data.image, np.arange(truth.shape[0]), config.mode))
    curve = []
    train_seconds = 0.0
    for step in range(config.iterations):
        t0 = time.perf_counter()
        method.train()
        unlabelled = sampler.unlabelled() if method.uses_unlabelled else None  # as the engine
        if unlabelled is not None:
            unlabelled = unlabelled.to(device)
        loss, _ = method.training_loss(sampler.labelled().to(device), unlabelled, step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(params, config.clip_grad_norm)
        optimiser.step()
        schedule.step()
        method.after_step(step)
        train_seconds += time.perf_counter() - t0
        if (step + 1) % args.eval_every == 0 or step + 1 == config.iterations:
            t1 = time.perf_counter()
            bias = calibrate_after_training(
                method, sampler, device, batchnorm=not args.no_recalibrate
            )
            with torch.no_grad():
                probs = torch.cat(
                    [
                        predict_probabilities(method, x_all[i : i + 8].to(device)).cpu()
                        for i in range(0, len(x_all), 8)
                    ]
                )
            if args.save_probs:
                np.save(args.save_probs, adjust_background(probs, bias).numpy())
            pred = probs.argmax(1).numpy()
            pred_bias = adjust_background(probs, bias).argmax(1).numpy()
            predict_seconds = time.perf_counter() - t1
            d = dice(pred[unannotated], truth[unannotated])
            d_bias = dice(pred_bias[unannotated], truth[unannotated])
            window = vote_window(config.vote, project)
            voted = vote_volume(pred_bias, window, num_classes=data.num_classes)
            d_vote = dice(voted[unannotated], truth[unannotated])
            curve.append(
                {
                    "iteration": step + 1,
                    "train_s": round(train_seconds, 1),
                    "predict_s": round(predict_seconds, 1),
                    "dice": round(d, 4),
                    "bias": bias,
                    "dice_calibrated": round(d_bias, 4),
                    "dice_voted": round(d_vote, 4),
                }
            )
            print(
                json.dumps(
                    {
                        "tag": args.set + args.setting,
                        "method": args.method,
                        "noisy": args.noisy,
                        "slices": args.slices,
                        "seed": args.seed,
                        **curve[-1],
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
