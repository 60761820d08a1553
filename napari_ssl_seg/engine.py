"""One round of semi-supervised training, as a generator of progress reports.

``train_round`` is the single training loop: the CLI prints what it yields, the widget
relays it from a child process. Reading it top to bottom gives the whole round:

1. read the human labels (and the previous round's confident pseudo-labels);
2. build the method, optionally from the previous round's weights;
3. label-free pretraining if the method wants it and the project has none cached;
4. ``iterations`` optimiser steps on two-stream batches (never on the human voxels held
   out for validation);
5. fit the pixel forest on the same voxels, score the network, the forest and their
   ensemble (with and without the background bias and the vote) on the held-out voxels,
   choose the best (:func:`choose_output`), refit the forest on every human voxel;
6. predict the whole volume with the choice into a new round, rank slices, commit it.

Stopping (``should_stop`` returns True) ends training at the next iteration, keeps the
weights and still writes the round, so the work done is never lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import platform
import random
import time
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import torch

from napari_ssl_seg import __version__
from napari_ssl_seg.config import AUTO, TrainConfig, check_training_memory, resolve_method
from napari_ssl_seg.data import (
    TrainingSet,
    TwoStreamSampler,
    in_channels,
    load_training_set,
    plane_to_slice_spacing,
)
from napari_ssl_seg.errors import ProjectError
from napari_ssl_seg.inference import (
    calibrate_background_bias,
    predict_into_round,
    rank_slices,
    recalibrate_batchnorm,
)
from napari_ssl_seg.methods import NetworkConfig, SSLMethod, get_method
from napari_ssl_seg.store import Project
from napari_ssl_seg.validation import (
    candidate_name,
    choose,
    fit_round_forest,
    validate_candidates,
)

Progress = dict[str, Any]


#: Training-distribution batches whose BatchNorm statistics are averaged after training
#: (see :func:`napari_ssl_seg.inference.recalibrate_batchnorm`); 15 measured the same as
#: 30 on the sample (clean and noisy, seeds 0 and 1) and saves a second per round.
BATCHNORM_BATCHES = 15


def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU for "auto"; otherwise the device named."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_method(config: TrainConfig, *, num_classes: int) -> SSLMethod:
    """Instantiate ``config.method`` with the backbone and method settings of ``config``."""
    cls = get_method(config.method)
    method = cls(
        in_channels=in_channels(config.mode),
        num_classes=num_classes,
        spatial_dims=3 if config.mode == "3d" else 2,
        total_iterations=config.iterations,
        network=NetworkConfig(features=config.features, norm=config.norm, dropout=config.dropout),
        settings=cls.make_settings(config.settings),
    )
    if config.mode != "3d":
        # oneDNN's NHWC convolutions: on a 2-core CPU a 2D training step is 11% faster and
        # whole-volume prediction 1.6x. Loaded weights keep the layout (copied in place).
        method.to(memory_format=torch.channels_last)
    return method


def checkpoint_bytes(method: SSLMethod, config: TrainConfig, extra: dict[str, Any]) -> bytes:
    """A plain-dict checkpoint (weights, config, provenance), loadable with weights_only."""
    payload = {
        "weights": method.state_dict(),
        "config": config.to_dict(),
        "method": config.method,
        "num_classes": method.num_classes,
        "version": __version__,
        **extra,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def load_checkpoint(source: os.PathLike | bytes, *, name: str | None = None) -> dict[str, Any]:
    """Load a checkpoint (a path, or its bytes) without executing any code stored in it.

    Raises
    ------
    ProjectError
        The file is not a checkpoint this package can load (truncated, damaged, or a
        pickle that needs code); the message names ``name`` (default the path).
    """
    name = name or str(source)
    data = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        ckpt = torch.load(data, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ProjectError(f"{name}: no such checkpoint") from None
    except Exception as err:  # noqa: BLE001 - torch and pickle raise many types here
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ProjectError(
            f"{name}: not a loadable checkpoint ({type(err).__name__}: {reason[:200]})"
        ) from None
    if not isinstance(ckpt, dict):
        raise ProjectError(f"{name}: not a napari-ssl-seg checkpoint (a {type(ckpt).__name__})")
    return ckpt


def load_round_checkpoint(project: Project, r: int | None = None) -> dict[str, Any]:
    """Round ``r``'s checkpoint (default latest), refused unless its sha256 is the one
    recorded when the round was committed."""
    r = project._resolve_round(r)
    return load_checkpoint(project.checkpoint_bytes(r), name=str(project.checkpoint_path(r)))


def load_method(project: Project, r: int | None = None) -> tuple[SSLMethod, dict[str, Any]]:
    """The trained method of round ``r`` (default latest) and its checkpoint dict."""
    ckpt = load_round_checkpoint(project, r)
    config = TrainConfig.from_dict(ckpt["config"])
    method = build_method(config, num_classes=int(ckpt["num_classes"]))
    method.load_state_dict(ckpt["weights"])
    return method, ckpt


def train_round(
    project: Project,
    config: TrainConfig,
    *,
    should_stop: Callable[[], bool] | None = None,
    refresh_final: bool = True,
) -> Generator[Progress, None, dict]:
    """Train one round and write it into ``project``; yields progress dicts.

    Parameters
    ----------
    project : Project
        Must hold at least one annotated slice (label contract: 0 = background on
        annotated voxels, 1..K-1 = classes; unannotated voxels are ignored).
    config : TrainConfig
    should_stop : callable, optional
        Polled every iteration; True stops training early and keeps the weights.
    refresh_final : bool
        Rewrite the merged ``final`` labels at the end. A training child process passes
        False: the process that owns the human edits refreshes it, so the two never
        write the same chunks at once.

    Yields
    ------
    dict
        ``phase`` ("load", "pretrain", "train", "validate", "predict", in 3D mode
        "write", "done"),
        ``iteration``, ``total``, ``elapsed`` and ``remaining`` seconds, ``losses`` while
        training, once ``choice`` (what method "auto" picked and why), and ``note`` for
        something the user should know (a damaged pretraining cache being replaced).

    Returns
    -------
    dict
        The committed round record (also in ``project.rounds()``).
    """
    if config.method != AUTO:  # bad names fail before any work
        get_method(config.method).make_settings(config.settings)
    started = time.time()
    started_iso = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stop = should_stop or (lambda: False)
    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    check_training_memory(config, device=device)  # before any data is loaded
    revision = project.revision
    previous = project.latest_round
    yield {"phase": "load", "iteration": 0, "total": config.iterations, "elapsed": 0.0}

    with project.reading():  # a damaged chunk: one line naming the array
        data = load_training_set(
            project,
            config,
            holdout=0.0 if config.mode == "3d" else config.validation_fraction,
            # The band rotates with the round (and the seed), so over rounds every human
            # voxel both trains and validates.
            rotation=config.seed + previous + 1,
        )
    config, choice = resolve_method(config, len(data.human_slices))
    if choice:
        yield {
            "phase": "load",
            "iteration": 0,
            "total": config.iterations,
            "elapsed": time.time() - started,
            "choice": choice,
        }
    method = build_method(config, num_classes=data.num_classes)
    initialised_from = "scratch"
    if config.init == "previous" and previous >= 1:
        ckpt = load_round_checkpoint(project, previous)
        # Only the same method's weights that fit tensor for tensor (classes, widths,
        # settings such as an ensemble's size); otherwise the round starts from scratch.
        if ckpt["method"] == config.method and _same_layout(ckpt["weights"], method.state_dict()):
            method.load_state_dict(ckpt["weights"])
            initialised_from = f"round {previous}"
        else:
            initialised_from = f"scratch (round {previous}'s networks differ)"
    method.to(device)
    sampler = TwoStreamSampler(data, config)

    yield from _pretrain(project, method, sampler, config, device, stop, started)

    params = [p for p in method.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimiser, config.iterations, power=0.9)
    train_started = time.time()
    losses: dict[str, float] = {}
    done = 0
    for step in range(config.iterations):
        if stop():
            break
        method.train()
        labelled = sampler.labelled().to(device)
        # A prefetching thread for the next batch was tried: slower on 2 cores (17.7 s
        # against 16.4 s for 200 iterations), the cores being busy with torch already.
        unlabelled = sampler.unlabelled().to(device) if method.uses_unlabelled else None
        loss, losses = method.training_loss(labelled, unlabelled, step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(params, config.clip_grad_norm)
        optimiser.step()
        schedule.step()
        method.after_step(step)
        done = step + 1
        elapsed = time.time() - train_started
        yield {
            "phase": "train",
            "iteration": done,
            "total": config.iterations,
            "losses": {"loss": float(loss.detach()), **losses},
            "elapsed": time.time() - started,
            "remaining": elapsed / done * (config.iterations - done),
        }
    trained_seconds = time.time() - train_started

    bias = calibrate_after_training(method, sampler, device)
    window = vote_window(config.vote, project)
    guard = yield from _with_elapsed(
        choose_output(method, data, config, device=device, background_bias=bias, window=window),
        started,
    )
    data.drop_cache()  # the prediction's slabs take its place
    # What prediction did besides the network, kept so the round can be re-made exactly
    # (the forest is refitted from the human labels of ``revision`` with ``seed``).
    prediction = {
        "norm": list(data.norm),
        "source": guard["source"],
        "background_bias": guard["background_bias"],
        "calibrated_background_bias": bias,
        "smoothing_sigmas": list(data.smoothing),
        "vote_window": list(guard["vote_window"]),
    }
    writer = project.begin_round()
    try:
        scores = yield from _with_elapsed(
            predict_into_round(
                project,
                method,
                writer,
                norm=data.norm,
                mode=config.mode,
                device=device,
                background_bias=guard["background_bias"],
                vote_window=tuple(guard["vote_window"]),
                smoothing=data.smoothing,
                source=guard["source"],
                forest=guard["forest"],
            ),
            started,
        )
    except BaseException:
        # Frees the round number now; if even that fails, the next round frees it.
        with contextlib.suppress(ProjectError):
            writer.abort()
        raise
    ckpt = checkpoint_bytes(
        method,
        config,
        {"round": writer.round, "revision": revision, **prediction},
    )
    record = {
        "method": config.method,
        "method_choice": choice,
        "config": config.to_dict(),
        "seed": config.seed,
        "started": started_iso,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 2),
        "train_seconds": round(trained_seconds, 2),
        "iterations_done": done,
        "stopped_early": done < config.iterations,
        "initialised_from": initialised_from,
        "pseudo_labels_from_round": previous if config.pseudo_weight > 0 else 0,
        "revision": revision,
        "num_classes": data.num_classes,
        "human_slices": data.human_slices,
        "metrics": {"final_losses": losses},
        "validation": guard["validation"],
        "chosen": guard["chosen"],
        "uncertain_slices": rank_slices(scores),
        "device": str(device),
        # What the round's seconds ran with (the widget's child sets OpenMP's policy).
        "runtime": {
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "host": platform.node(),
        "version": __version__,
        **prediction,
    }
    record = writer.commit(record, ckpt)
    if refresh_final:
        project.refresh_final()
    yield {
        "phase": "done",
        "iteration": done,
        "total": config.iterations,
        "elapsed": time.time() - started,
        "round": writer.round,
    }
    return record


def choose_output(
    method: SSLMethod,
    data: TrainingSet,
    config: TrainConfig,
    *,
    device: torch.device,
    background_bias: float,
    window: tuple[int, int, int],
) -> Generator[Progress, None, dict[str, Any]]:
    """What the round writes, chosen on the held-out human voxels; yields progress.

    In 2D/2.5D the pixel forest is fitted on the voxels the network trained on, every
    candidate (:func:`napari_ssl_seg.validation.validate_candidates`; only the sources
    ``config.output`` allows) is scored on the held-out voxels and the best is chosen;
    the forest is then refitted on every human voxel when the choice uses it. Without
    held-out voxels (``validation_fraction`` 0, or too few human voxels) the round writes
    the network (or the named output) with the background bias and the configured vote.
    3D mode writes the network.

    Returns
    -------
    dict
        ``source``, ``background_bias`` and ``vote_window`` to predict with, ``forest``
        (a :class:`~napari_ssl_seg.forest.PixelForest` or None), ``validation`` (for the
        round record: held-out share and voxels, per-candidate Dice; None without) and
        ``chosen`` (candidate, source, whether bias and vote are applied, and why).
    """
    voted = any(w > 1 for w in window)
    if config.mode == "3d":
        return _output("network", background_bias, window, None, None, "3d mode: the network")
    source = "network" if config.output == AUTO else config.output
    threads = torch.get_num_threads()
    if not data.held_out:
        forest = None
        if source != "network":
            forest = fit_round_forest(data, held_out=False, n_jobs=threads, seed=config.seed)
        bias = background_bias if source != "forest" else 0.0
        why = "nothing held out for validation"
        why += ": the network" if config.output == AUTO else ""
        return _output(source, bias, window, forest, None, why)
    held = list(data.held_out)
    yield {"phase": "validate", "iteration": 0, "total": len(held) + 1}
    forest = fit_round_forest(data, held_out=False, n_jobs=threads, seed=config.seed)
    yield {"phase": "validate", "iteration": 1, "total": len(held) + 1}
    scores = validate_candidates(
        method,
        forest,
        data,
        mode=config.mode,
        device=device,
        background_bias=background_bias,
        vote_window=window,
    )
    allowed = {n: s for n, s in scores.items() if config.output in (AUTO, n.split("+")[0])}
    name, why = choose(allowed)
    if config.output != AUTO:
        why = f"output {config.output!r} asked for; {why}"
    yield {"phase": "validate", "iteration": len(held) + 1, "total": len(held) + 1}
    source, steps = name.split("+")[0], name.split("+")[1:]
    if source != "network":  # the volume's forest learns from every human voxel
        forest = fit_round_forest(data, held_out=True, n_jobs=threads, seed=config.seed)
    human = data.human_voxels(held_out=True)
    total = sum(int(mask.sum()) for _, mask in human.values())
    out = sum(int(mask.sum()) for _, mask in data.held_out.values())
    validation = {
        "measured_on": (
            "human-labelled voxels held out of training (a band of rows of each annotated "
            "slice); Dice per foreground class and its mean over the classes"
        ),
        "held_out_fraction": round(out / max(1, total), 4),
        "held_out_voxels": out,
        "held_out_slices": sorted(int(i) for i in held),
        "candidates": scores,
    }
    return _output(
        source,
        background_bias if "bias" in steps else 0.0,
        window if "vote" in steps or not voted else (1, 1, 1),
        forest if source != "network" else None,
        validation,
        why,
        name=name,
    )


def _output(source, bias, window, forest, validation, why, *, name=None) -> dict[str, Any]:
    voted = any(w > 1 for w in window)
    name = name or candidate_name(source, bool(bias), voted)
    chosen = {
        "candidate": name,
        "source": source,
        "background_bias": bool(bias),
        "vote": voted,
        "why": why,
    }
    if validation is not None:
        chosen["dice"] = validation["candidates"][name]
    return {
        "source": source,
        "background_bias": float(bias),
        "vote_window": tuple(window),
        "forest": forest,
        "validation": validation,
        "chosen": chosen,
    }


def _pretrain(
    project, method, sampler, config, device, stop, started
) -> Generator[Progress, None, None]:
    """Label-free pretraining (diffusion stage 1), cached in the project by data + settings."""
    n = method.pretrain_iterations()
    if n <= 0:
        return
    key = hashlib.sha1(
        repr(
            (
                project.signature,
                config.method,
                config.features,
                config.mode,
                sorted(config.settings.items()),
            )
        ).encode()
    ).hexdigest()[:12]
    name = f"{config.method}-{key}"
    try:
        cached = project.load_pretrained(name)
        if cached is not None:
            method.load_pretrain_state(load_checkpoint(cached, name=name)["weights"])
            return
    except ProjectError as err:  # damaged or unverifiable: pretrain again and replace it
        yield {
            "phase": "pretrain",
            "iteration": 0,
            "total": n,
            "elapsed": time.time() - started,
            "note": f"ignoring the cached pretraining weights: {err}; pretraining again",
        }
    params = [p for p in method.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=config.lr)
    for step in range(n):
        if stop():
            return
        method.train()
        loss, parts = method.pretrain_loss(sampler.unlabelled().to(device), step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        yield {
            "phase": "pretrain",
            "iteration": step + 1,
            "total": n,
            "losses": {"loss": float(loss.detach()), **parts},
            "elapsed": time.time() - started,
        }
    buf = io.BytesIO()
    torch.save({"weights": method.pretrain_state(), "iterations": n, "version": __version__}, buf)
    project.save_pretrained(name, buf.getvalue())


def vote_window(width: int, project: Project) -> tuple[int, int, int]:
    """The majority-vote box (slices, rows, columns) for ``TrainConfig.vote`` = ``width``.

    In-plane ``width`` voxels; along the slicing axis the same physical extent where the
    voxel size is known (rounded to an odd count, at least 1), else ``width`` voxels.
    """
    along = width
    if width > 1:  # plane_to_slice_spacing is 1 where the voxel size is unknown
        along = width * plane_to_slice_spacing(project)
        along = max(1, int(round((along - 1) / 2)) * 2 + 1)
    return (along, width, width)


def _same_layout(saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts have the same tensor names and shapes."""
    return saved.keys() == current.keys() and all(
        tuple(saved[k].shape) == tuple(current[k].shape) for k in current
    )


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Scale the gradients of ``params`` to a global norm of at most ``max_norm`` (0: off).

    Without normalisation layers one odd batch can blow the logits up (see
    ``TrainConfig.clip_grad_norm``); clipping keeps that step as small as the others.
    """
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def calibrate_after_training(
    method: SSLMethod, sampler: TwoStreamSampler, device: torch.device, *, batchnorm: bool = True
) -> float:
    """Make a trained method's predictions trustworthy; return the background bias.

    BatchNorm statistics are re-averaged over ``BATCHNORM_BATCHES`` training-distribution
    batches (skipped with ``batchnorm=False``), then one background-logit bias is fitted
    on the human-labelled voxels (:func:`napari_ssl_seg.inference.calibrate_background_bias`).
    """
    if batchnorm:
        recalibrate_batchnorm(method, _training_inputs(sampler, device, n=BATCHNORM_BATCHES))
    data = sampler.data
    return calibrate_background_bias(
        method,
        data.image,
        data.target,
        data.weight,
        data.human_slices,
        mode=sampler.config.mode,
        device=device,
    )


def _training_inputs(sampler: TwoStreamSampler, device: torch.device, *, n: int):
    """``n`` input batches drawn like the training batches (labelled + unlabelled crops)."""
    for _ in range(n):
        images = [sampler.labelled().image]
        if sampler.config.unlabelled_batch > 0:
            images.append(sampler.unlabelled().image)
        yield torch.cat(images).to(device)


def _with_elapsed(
    gen: Generator[Progress, None, Any], started: float
) -> Generator[Progress, None, Any]:
    """Relay ``gen``'s reports with the round's elapsed time; return its value."""
    while True:
        try:
            report = next(gen)
        except StopIteration as finished:
            return finished.value
        yield {**report, "elapsed": time.time() - started}


def run_round(
    project: Project,
    config: TrainConfig,
    *,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Run :func:`train_round` to the end, passing each report to ``progress``."""
    gen = train_round(project, config, should_stop=should_stop)
    while True:
        try:
            report = next(gen)
        except StopIteration as finished:
            return finished.value
        if progress is not None:
            progress(report)
