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
def test_rounds_condition_on_the_first_mask_or_the_previous_round(chained):
    method = make(rounds=2, chained_rounds=chained)
    masks, segmentations = [], []  # image-pathway mask inputs; teacher mask outputs

    def keep_mask(module, args, output) -> None:
        masks.append(args[0][:, 1:].detach().clone())  # input [noisy image (1) || mask]

    def keep_logits(module, args, output) -> None:
        segmentations.append(output.detach().clone())

    method.teacher["image"].register_forward_hook(keep_mask)
    method.teacher["mask"].register_forward_hook(keep_logits)
    loss, parts = method.training_loss(*batches(), 0)
    loss.backward()
    assert torch.isfinite(loss) and parts["rounds_l"] > 0 and parts["rounds_u"] > 0
    assert grad_norm(method.teacher["image"]) > 0
    # teacher mask pathway: first segmentation, then one re-segmentation per round
    assert len(masks) == 2 and len(segmentations) == 3
    first, round_1 = (2 * logits.softmax(1) - 1 for logits in segmentations[:2])
    torch.testing.assert_close(masks[0], first)
    if chained:
        torch.testing.assert_close(masks[1], round_1)
        assert not torch.allclose(masks[1], first)
    else:
        torch.testing.assert_close(masks[1], first)


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


# --- reference values: schedule, posterior, reconstruction, CPS term --------------------


def linear_alpha_bar(timesteps: int) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), beta linear from 1e-4 to 0.02 (DDPM)."""
    betas = [1e-4 + (0.02 - 1e-4) * i / (timesteps - 1) for i in range(timesteps)]
    return torch.tensor([math.prod(1 - b for b in betas[: t + 1]) for t in range(timesteps)])


def test_forward_process_q_xt_given_x0():
    method = make(schedule="linear", timesteps=10, inference_timestep=5)
    alpha_bar = linear_alpha_bar(10)
    torch.testing.assert_close(method.scheduler.alphas_cumprod, alpha_bar)
    x0, noise = torch.full((3, 1, 2, 2), 0.5), torch.full((3, 1, 2, 2), -1.0)
    t = torch.tensor([0, 4, 9])
    expected = alpha_bar[t].sqrt() * 0.5 - (1 - alpha_bar[t]).sqrt()
    noisy = method.scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(noisy, expected.view(3, 1, 1, 1).expand(3, 1, 2, 2))


def test_sigmoid_schedule_alpha_bar():
    # lucidrains' sigmoid schedule (start -3, end 3, tau 1): alpha_bar(s) proportional to
    # sigmoid(3) - sigmoid(-3 + 6 s / T), 1 at s = 0; MONAI's index t is s = t + 1
    method = make()
    T = 1000
    v_start, v_end = 1 / (1 + math.exp(3)), 1 / (1 + math.exp(-3))
    s = torch.arange(1, T, dtype=torch.float64)
    expected = (v_end - torch.sigmoid(-3 + 6 * s / T)) / (v_end - v_start)
    torch.testing.assert_close(
        method.scheduler.alphas_cumprod[: T - 1].double(), expected, atol=1e-5, rtol=1e-4
    )


class NoiseOracle(torch.nn.Module):
    """An image pathway that knows the clean image (passed as mask channel 0): returns the
    exact noise plus ``error``, and records the timesteps it was asked about."""

    def __init__(self, alpha_bar: torch.Tensor, error: float) -> None:
        super().__init__()
        self.alpha_bar, self.error, self.seen = alpha_bar, error, []

    def forward(self, x, t):
        self.seen.append(t)
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        noisy, clean = x[:, :1], x[:, 1:2]
        return (noisy - a.sqrt() * clean) / (1 - a).sqrt() + self.error


@pytest.mark.parametrize("error", [0.0, 0.5])
def test_reconstruction_inverts_the_forward_process(error):
    method = make(schedule="linear", timesteps=10, inference_timestep=5)
    alpha_bar = linear_alpha_bar(10)
    method.teacher["image"] = NoiseOracle(alpha_bar, error)
    image = torch.linspace(-1, 1, 2 * 16).view(2, 1, 4, 4)
    mask = torch.cat([image, torch.zeros_like(image)], 1)
    recon, mse = method._reconstruct(image, mask)
    torch.testing.assert_close(mse, torch.full((2,), error**2), atol=1e-5, rtol=1e-5)
    a = alpha_bar[method.teacher["image"].seen[0]].view(-1, 1, 1, 1)
    # x0 = (x_t - sqrt(1 - a) eps_hat) / sqrt(a), clamped to each image's range
    expected = image - error * ((1 - a) / a).sqrt()
    expected = torch.maximum(expected, image.flatten(1).amin(1).view(2, 1, 1, 1))
    torch.testing.assert_close(recon, expected, atol=1e-4, rtol=1e-4)


def test_ddim_steps_follow_the_posterior_mean_of_a_known_schedule():
    method = make(schedule="linear", timesteps=10, inference_timestep=5, ddim_steps=3)
    alpha_bar = linear_alpha_bar(10)

    def net(x, t):  # logits that depend on the mask it is given (channels 0..1)
        return 3 * x[:, :2] + 0.1 * t.view(-1, 1, 1, 1)

    image = torch.zeros(1, 1, 4, 4)
    start = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    logits = method._ddim(net, image, start)
    # by hand: timesteps 9, 4 (linspace(9, 0, 3) rounded half to even), 0
    x = start
    for t, t_next in [(9, 4), (4, 0)]:
        x0 = 2 * net(x, torch.tensor([t])).softmax(1) - 1
        eps = (x - alpha_bar[t].sqrt() * x0) / (1 - alpha_bar[t]).sqrt()
        x = alpha_bar[t_next].sqrt() * x0 + (1 - alpha_bar[t_next]).sqrt() * eps
    torch.testing.assert_close(logits, net(x, torch.tensor([0])), atol=1e-5, rtol=1e-5)


def constant_logits(net, values) -> None:
    """Make a mask pathway return ``values`` at every voxel (zero output conv, bias)."""
    conv = net.out[-1].conv
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor(values))


def ce_dice_of_constant_probs(p_target: float, p_other: float, n: int) -> float:
    """0.5 (CE + Dice) of K = 2 constant probabilities over n voxels all of one class."""
    eps = 1e-5
    dice_target = (2 * p_target * n + eps) / (p_target**2 * n + n + eps)
    dice_other = eps / (p_other**2 * n + eps)
    return 0.5 * (-math.log(p_target) + 1 - (dice_target + dice_other) / 2)


def test_cps_term_of_known_pathways_uses_the_others_argmax():
    method = make(rounds=0)
    constant_logits(method.teacher["mask"], [2.0, 0.0])  # the teacher says background
    constant_logits(method.student["mask"], [0.0, 1.0])  # the student says class 1
    labelled, unlabelled = batches(weight=0.0)
    _, parts = method.training_loss(labelled, unlabelled, 3)
    n = 2 * 32 * 32
    student_learns_0 = ce_dice_of_constant_probs(1 / (1 + math.e), math.e / (1 + math.e), n)
    e2 = math.exp(2.0)
    teacher_learns_1 = ce_dice_of_constant_probs(1 / (1 + e2), e2 / (1 + e2), n)
    assert parts["cps"] == pytest.approx(student_learns_0 + teacher_learns_1, rel=1e-5)
