"""Tests of the diffusion teacher + twin student (tiny nets, 32 x 32 and 16^3)."""

from __future__ import annotations

import math

import pytest
import torch

from napari_ssl_seg.methods import Batch, NetworkConfig, get_method
from napari_ssl_seg.methods.diffusion import DiffusionMethod, DiffusionSettings

torch.set_num_threads(1)


def make(seed=0, *, num_classes=2, spatial_dims=2, **overrides) -> DiffusionMethod:
    torch.manual_seed(seed)
    settings = DiffusionMethod.make_settings({"width": 8, **overrides})
    return DiffusionMethod(
        in_channels=1,
        num_classes=num_classes,
        spatial_dims=spatial_dims,
        total_iterations=10,
        network=NetworkConfig(),
        settings=settings,
    )


def batches(num_classes=2, size=(32, 32), weight=1.0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 1, *size, generator=gen)
    target = torch.randint(0, num_classes, (2, *size), generator=gen)
    labelled = Batch(image, target, torch.full(target.shape, weight))
    return labelled, Batch(torch.randn(2, 1, *size, generator=gen))


def grad_norm(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_registered():
    assert get_method("diffusion") is DiffusionMethod


def test_cycle_loss_trains_mask_pathway_without_labels():
    method = make()
    _, unlabelled = batches()
    assert unlabelled.target is None and unlabelled.weight is None
    loss, parts = method.pretrain_loss(unlabelled, 0)
    loss.backward()
    assert torch.isfinite(loss) and parts["cycle"] > 0
    assert grad_norm(method.teacher["mask"]) > 0
    assert grad_norm(method.teacher["image"]) > 0
    assert grad_norm(method.student) == 0
    assert method.pretrain_iterations() == 0  # off by default (see DiffusionSettings)
    assert make(pretrain_iterations=200).pretrain_iterations() == 200


def test_cps_term_alone_trains_both_nets():
    # Zero-weight labels and no rounds: only lambda * CPS on the unlabelled half is left.
    method = make(rounds=0)
    labelled, unlabelled = batches(weight=0.0)
    loss, parts = method.training_loss(labelled, unlabelled, 3)
    assert parts["sup"] == 0 and parts["cps"] > 0 and parts["ramp"] == pytest.approx(0.4)
    loss.backward()
    assert grad_norm(method.student["mask"]) > 0
    assert grad_norm(method.teacher["mask"]) > 0
    assert grad_norm(method.teacher["image"]) == 0


@pytest.mark.parametrize("chained", [False, True])
def test_rounds_run(chained):
    method = make(rounds=2, chained_rounds=chained)
    loss, parts = method.training_loss(*batches(), 0)
    loss.backward()
    assert torch.isfinite(loss) and parts["rounds_l"] > 0 and parts["rounds_u"] > 0
    assert grad_norm(method.teacher["image"]) > 0


def test_dice_only_and_sigmoid_ramp():
    method = make(supervised_loss="dice", rampup="sigmoid", schedule="linear")
    loss, parts = method.training_loss(*batches(), 9)
    assert torch.isfinite(loss) and parts["ramp"] == pytest.approx(math.exp(-5 * 0.1**2))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"inference_timesteps": "0,500"},
        {"ddim_steps": 3},
        {"deploy": "student"},
        {"deploy": "both"},
        {"deploy": "both", "ddim_steps": 2},
    ],
)
def test_predict_is_deterministic(overrides):
    image = batches()[1].image
    first = make(**overrides).predict(image)
    again = make(**overrides)
    assert torch.equal(first, again.predict(image))
    assert torch.equal(first, again.predict(image))
    assert first.shape == (2, 2, 32, 32)
    torch.testing.assert_close(first.sum(1), torch.ones(2, 32, 32))


def test_deploy_both_averages_teacher_and_student():
    image = batches()[1].image
    method = make()
    method.eval()
    with torch.no_grad():  # the twins start from different weights, so they disagree
        method.student["mask"].apply(
            lambda m: m.weight.add_(0.1) if isinstance(m, torch.nn.Conv2d) else None
        )
    by_deploy = {}
    for deploy in ("teacher", "student", "both"):
        method.settings.deploy = deploy
        by_deploy[deploy] = method.predict(image)
    assert not torch.allclose(by_deploy["teacher"], by_deploy["student"])
    torch.testing.assert_close(
        by_deploy["both"], (by_deploy["teacher"] + by_deploy["student"]) / 2
    )


def test_pretrain_state_round_trip():
    source, target = make(seed=0), make(seed=1)
    image = batches()[1].image
    assert not torch.equal(source.predict(image), target.predict(image))
    target.load_pretrain_state(source.pretrain_state())
    assert torch.equal(source.predict(image), target.predict(image))
    with pytest.raises(ValueError, match="does not fit this teacher"):
        make(width=16).load_pretrain_state(source.pretrain_state())


def test_three_classes_3d():
    method = make(num_classes=3, spatial_dims=3)
    labelled, unlabelled = batches(num_classes=3, size=(16, 16, 16))
    loss, _ = method.training_loss(labelled, unlabelled, 0)
    cycle, _ = method.pretrain_loss(unlabelled, 0)
    (loss + cycle).backward()
    probs = method.predict(unlabelled.image)
    assert probs.shape == (2, 3, 16, 16, 16)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 16, 16, 16))


def test_odd_sizes_are_padded():
    method = make()
    labelled, unlabelled = batches(size=(30, 34))
    loss, _ = method.training_loss(labelled, unlabelled, 0)
    loss.backward()
    assert method.predict(unlabelled.image).shape == (2, 2, 30, 34)


def test_batch_norm_variant_trains_and_recalibrates_only_the_mask_pathways():
    from napari_ssl_seg.inference import recalibrate_batchnorm

    method = make(norm="batch")
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in method.modules())
    loss, _ = method.training_loss(*batches(), 0)
    loss.backward()
    assert grad_norm(method.student["mask"]) > 0 and grad_norm(method.teacher["mask"]) > 0
    image_norms = [
        m for m in method.teacher["image"].modules() if isinstance(m, torch.nn.BatchNorm2d)
    ]
    before = [m.running_mean.clone() for m in image_norms]
    n = recalibrate_batchnorm(method, [batches(seed=s)[1].image + 3.0 for s in range(3)])
    mask_norms = [
        m
        for net in (method.teacher["mask"], method.student["mask"])
        for m in net.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    assert n == len(mask_norms) > 0
    assert all(m.num_batches_tracked == 3 and m.momentum == 0.1 for m in mask_norms)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, image_norms, strict=True))
    method.eval()
    assert torch.equal(method.predict(batches()[1].image), method.predict(batches()[1].image))


def test_bad_inputs():
    with pytest.raises(ValueError, match="width must be a positive multiple of 8, got 12"):
        DiffusionSettings(width=12)
    with pytest.raises(ValueError, match=r"deploy must be one of \['both', 'student', 'teach"):
        DiffusionSettings(deploy="ema")
    with pytest.raises(ValueError, match="schedule must be one of"):
        DiffusionSettings(schedule="quadratic")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1000\), got 1000"):
        DiffusionSettings(inference_timesteps=(0, 1000))
    with pytest.raises(ValueError, match=r"rampup_fraction must be in \[0, 1\], got 2"):
        DiffusionSettings(rampup_fraction=2.0)
    with pytest.raises(ValueError, match=r"norm must be one of \['batch', 'group'\]"):
        DiffusionSettings(norm="instance")
    with pytest.raises(ValueError, match="rounds must be >= 0, got -1"):
        DiffusionSettings(rounds=-1)
    with pytest.raises(ValueError, match="unknown setting"):
        DiffusionMethod.make_settings({"lr": 0.01})
    with pytest.raises(TypeError, match="settings must be DiffusionSettings"):
        DiffusionMethod(
            in_channels=1,
            num_classes=2,
            spatial_dims=2,
            total_iterations=1,
            network=NetworkConfig(),
            settings={},
        )
    method = make()
    with pytest.raises(ValueError, match=r"must be \(B, 1, H, W\), got shape \(1, 2, 32, 32\)"):
        method.predict(torch.zeros(1, 2, 32, 32))
    labelled, unlabelled = batches()
    with pytest.raises(ValueError, match="needs both target and weight"):
        method.training_loss(Batch(labelled.image), unlabelled, 0)
