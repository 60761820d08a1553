"""Contract tests run against every registered method (the diffusion teacher has its own)."""

from __future__ import annotations

import math

import pytest
import torch

from napari_ssl_seg.losses import sigmoid_rampup
from napari_ssl_seg.methods import Batch, NetworkConfig, get_method, method_names

torch.set_num_threads(1)

NET = NetworkConfig(features=(8, 8, 16, 16, 32, 8))
TOTAL = 100
METHODS = [name for name in method_names() if name != "diffusion"]
SSL_METHODS = [name for name in METHODS if name != "supervised"]
TEACHER_METHODS = ["mean-teacher", "ua-mt", "simcvd"]
# (num_classes, spatial shape): binary and multi-class 2D, and one 3D patch.
CASES = [(2, (32, 32)), (3, (32, 32)), (2, (16, 16, 16))]
CASE_IDS = ["2d-K2", "2d-K3", "3d-K2"]


def make_method(name, *, num_classes=2, spatial_dims=2, **overrides):
    cls = get_method(name)
    torch.manual_seed(0)
    return cls(
        in_channels=1,
        num_classes=num_classes,
        spatial_dims=spatial_dims,
        total_iterations=TOTAL,
        network=NET,
        settings=cls.make_settings(overrides),
    )


def make_batches(num_classes=2, shape=(32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((2, 1, *shape), generator=g)
    target = torch.randint(0, num_classes, (2, *shape), generator=g)
    weight = (torch.rand((2, *shape), generator=g) > 0.3).float()
    return Batch(image, target, weight), Batch(torch.randn((2, 1, *shape), generator=g))


def seeded_loss(method, labelled, unlabelled, step, seed=1):
    torch.manual_seed(seed)  # teacher noise, dropout and voxel sampling repeat exactly
    return method.training_loss(labelled, unlabelled, step)


@pytest.mark.parametrize(("num_classes", "shape"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", METHODS)
def test_loss_gradients_and_predict(name, num_classes, shape):
    method = make_method(name, num_classes=num_classes, spatial_dims=len(shape))
    method.train()
    labelled, unlabelled = make_batches(num_classes, shape)
    loss, parts = method.training_loss(labelled, unlabelled, TOTAL - 1)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert "supervised" in parts and all(isinstance(v, float) for v in parts.values())
    loss.backward()

    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    groups = {n for n, _ in method.named_children()}
    groups |= {n for n, _ in method.named_modules() if n.endswith(("head", "projection"))}
    for group in groups:
        grads = [p.grad for n, p in trainable.items() if n.startswith(group + ".")]
        if grads:  # teachers have no trainable parameters
            assert sum(g.abs().sum() for g in grads) > 0, f"{group} gets no gradient"
    if hasattr(method, "teacher"):
        assert all(p.grad is None for p in method.teacher.parameters())

    probs = method.predict(labelled.image)
    assert probs.shape == (2, num_classes, *shape)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, *shape))
    assert method.training, "predict must restore training mode"
    torch.testing.assert_close(method.predict(labelled.image), probs)  # eval: deterministic


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 50) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 50) == 1.0 and sigmoid_rampup(80, 50) == 1.0
    values = [sigmoid_rampup(s, 50) for s in range(0, 60, 5)]
    assert values == sorted(values)


@pytest.mark.parametrize("name", SSL_METHODS)
def test_consistency_ramps_up(name):
    method = make_method(name)
    assert method.ramp_weight(0) < 0.01
    assert method.ramp_weight(TOTAL - 1) == pytest.approx(1.0)
    labelled, unlabelled = make_batches()
    _, early = seeded_loss(method, labelled, unlabelled, 0)
    _, late = seeded_loss(method, labelled, unlabelled, TOTAL - 1)
    assert early["consistency"] < 1e-2
    assert late["consistency"] > 0
    if name in TEACHER_METHODS:  # warm-up: exactly zero
        assert early["consistency"] == 0.0


def test_ema_teacher_moves_toward_student():
    method = make_method("mean-teacher")
    method.after_step(0)  # decay 0 at step 0: the teacher becomes the student

    def distance():
        pairs = zip(method.teacher.parameters(), method.student.parameters(), strict=True)
        return sum((t - s).abs().sum().item() for t, s in pairs)

    assert distance() == 0.0
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.1)
    before = distance()
    method.after_step(20)  # decay min(1 - 1/21, 0.99): the teacher moves 1/21 of the way
    assert distance() == pytest.approx(before * 20 / 21, rel=1e-3)
    method.after_step(500)  # later the configured decay applies
    assert distance() == pytest.approx(before * 20 / 21 * method.settings.ema_decay, rel=1e-3)


@pytest.mark.parametrize("name", [*METHODS, "diffusion"])
def test_unannotated_voxels_are_ignored(name):
    small = {"width": 8} if name == "diffusion" else {}
    method = make_method(name, num_classes=3, **small)
    labelled, unlabelled = make_batches(3)
    changed = labelled.target.clone()
    unannotated = labelled.weight == 0
    changed[unannotated] = (changed[unannotated] + 1) % 3
    other = Batch(labelled.image, changed, labelled.weight)
    loss_a, parts_a = seeded_loss(method, labelled, unlabelled, TOTAL - 1)
    loss_b, parts_b = seeded_loss(method, other, unlabelled, TOTAL - 1)
    assert parts_a == pytest.approx(parts_b)
    torch.testing.assert_close(loss_a, loss_b)


@pytest.mark.parametrize("name", METHODS)
def test_no_annotated_voxel_gives_finite_loss(name):
    method = make_method(name)
    labelled, unlabelled = make_batches()
    empty = Batch(labelled.image, labelled.target, torch.zeros_like(labelled.weight))
    loss, _ = method.training_loss(empty, unlabelled, TOTAL - 1)
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("name", METHODS)
def test_unknown_setting_is_rejected(name):
    with pytest.raises(ValueError, match="bogus"):
        get_method(name).make_settings({"bogus": 1})


def test_bad_inputs():
    with pytest.raises(ValueError, match="'dtc'"):
        get_method("dtcc")
    method = make_method("supervised")
    with pytest.raises(ValueError, match=r"C = 1, got shape \(2, 3, 32, 32\)"):
        method.predict(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="got shape"):
        method.predict(torch.zeros(2, 1, 8, 32, 32))
    labelled, unlabelled = make_batches()
    with pytest.raises(ValueError, match="target and weight"):
        method.training_loss(Batch(labelled.image), unlabelled, 0)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        get_method("mean-teacher").make_settings({"ema_decay": 1.5})
    with pytest.raises(ValueError, match="uncertainty_passes"):
        get_method("ua-mt").make_settings({"uncertainty_passes": 1})


def disk_batches():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    target = (((yy - 14) ** 2 + (xx - 17) ** 2) < 64).long()
    image = target.float() + 0.1 * torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    labelled = Batch(image[None, None].repeat(2, 1, 1, 1), target[None].repeat(2, 1, 1))
    labelled.weight = torch.ones(2, 32, 32)
    unlabelled = Batch(torch.roll(labelled.image, (3, -2), dims=(2, 3)))
    return labelled, unlabelled


@pytest.mark.parametrize("name", ["supervised", "dtc"])
def test_training_reduces_the_loss(name):
    method = make_method(name)
    optimiser = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    labelled, unlabelled = disk_batches()
    history = []
    for step in range(30):
        loss, parts = method.training_loss(labelled, unlabelled, step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        method.after_step(step)
        history.append(parts["supervised"])
    assert sum(history[-5:]) < 0.5 * sum(history[:5])


def test_supervised_ensemble_trains_members_in_turn_and_averages_them():
    method = make_method("supervised", networks=3)
    method.train()
    labelled, unlabelled = make_batches()
    nets = method.nets
    assert len(nets) == 3 and len({id(n) for n in nets}) == 3
    first = [p.detach().clone() for p in nets[0].parameters()]
    assert not all(  # built one after the other: different initial weights
        torch.equal(a, b) for a, b in zip(first, nets[1].parameters(), strict=True)
    )
    for step in range(4):  # step s trains member s % 3 alone
        method.zero_grad(set_to_none=True)
        loss, _ = method.training_loss(labelled, unlabelled, step)
        loss.backward()
        graded = [any(p.grad is not None for p in net.parameters()) for net in nets]
        assert graded == [k == step % 3 for k in range(3)]
    probs = method.predict(labelled.image)
    torch.testing.assert_close(
        probs, sum(net.eval()(labelled.image).softmax(1) for net in nets) / 3
    )
    # one network keeps the single-network checkpoint layout ("net.*")
    single = make_method("supervised").state_dict()
    assert set(single) == {k for k in method.state_dict() if k.startswith("net.")}
    with pytest.raises(ValueError, match="networks must be an integer >= 1, got 0"):
        get_method("supervised").make_settings({"networks": 0})


# --- reference values of the unlabelled-data terms ---------------------------------------


def constant_output(conv: torch.nn.Module, values) -> None:
    """Make a 1x1 output convolution return ``values`` at every voxel (zero weight, bias)."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor(values, dtype=torch.float32))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dtc_dual_consistency_of_known_heads():
    method = make_method("dtc")  # heaviside_k 100
    constant_output(method.net.seg_head, [0.0, math.log(3.0)])  # p_fg = 0.75
    constant_output(method.net.sdf_head, [math.atanh(0.01)])  # sdf = 0.01, just outside
    _, parts = method.training_loss(*make_batches(), TOTAL - 1)
    assert parts["ramp"] == 1.0
    # sigmoid(-100 * 0.01): an SDF of the wrong sign would give sigmoid(+1)
    assert parts["consistency"] == pytest.approx((sigmoid(-1.0) - 0.75) ** 2, rel=1e-5)


def test_dtml_mutual_term_of_known_nets_counts_once_per_network():
    method = make_method("dtml")
    constant_output(method.seg_net.final_conv, [0.0, math.log(3.0)])
    constant_output(method.distance_net.final_conv, [math.atanh(0.01)])
    _, parts = method.training_loss(*make_batches(), TOTAL - 1)
    assert parts["consistency"] == pytest.approx(2 * (sigmoid(-1.0) - 0.75) ** 2, rel=1e-5)


def test_dtml_gradients_match_the_references_two_backward_calls():
    # train_la_dtml.py: model_seg_loss = L_seg + lambda L_cons and model_dis_loss = L_dis +
    # lambda L_cons, backpropagated one after the other into both networks.
    method = make_method("dtml")
    labelled, unlabelled = make_batches()
    unannotated = Batch(labelled.image, labelled.target, torch.zeros_like(labelled.weight))
    loss, _ = method.training_loss(unannotated, unlabelled, TOTAL - 1)  # L_cons terms only
    loss.backward()
    ours = {n: p.grad.clone() for n, p in method.named_parameters()}
    method.zero_grad(set_to_none=True)
    images = torch.cat([labelled.image, unlabelled.image])
    level = torch.sigmoid(-method.settings.heaviside_k * torch.tanh(method.distance_net(images)))
    mutual = torch.mean((level - method.seg_net(images).softmax(1)[:, 1:]) ** 2)
    lam = method.ramp_weight(TOTAL - 1)
    (lam * mutual).backward(retain_graph=True)  # model_seg_loss's consistency
    (lam * mutual).backward()  # model_dis_loss's consistency
    for name, param in method.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, msg=name)


def student_probs(method, unlabelled):
    with torch.no_grad():
        return method.student(unlabelled.image).softmax(1)


def test_mean_teacher_consistency_of_a_known_teacher():
    method = make_method("mean-teacher")
    constant_output(method.teacher.final_conv, [math.log(0.7), math.log(0.3)])
    labelled, unlabelled = make_batches()
    _, parts = method.training_loss(labelled, unlabelled, TOTAL - 1)
    teacher = torch.tensor([0.7, 0.3]).view(1, 2, 1, 1)
    expected = ((student_probs(method, unlabelled) - teacher) ** 2).mean().item()
    assert parts["consistency"] == pytest.approx(0.1 * expected, rel=1e-5)


@pytest.mark.parametrize(
    ("teacher_p", "step", "certain"),
    [
        (0.7, 0, False),  # entropy 0.611 > 0.75 ln 2 (+ a tiny ramp) = 0.521
        (0.7, TOTAL - 1, True),  # threshold ~ ln 2 = 0.693 at the end of the run
        (0.9, 0, True),  # entropy 0.325
    ],
)
def test_ua_mt_mask_at_a_known_entropy(teacher_p, step, certain):
    method = make_method("ua-mt", warmup_fraction=0.0)
    p = torch.tensor([teacher_p, 1 - teacher_p])
    constant_output(method.teacher.final_conv, p.log().tolist())
    labelled, unlabelled = make_batches()
    _, parts = method.training_loss(labelled, unlabelled, step)
    entropy = -(p * p.log()).sum().item()
    threshold = (0.75 + 0.25 * sigmoid_rampup(step, TOTAL)) * math.log(2)
    assert (entropy < threshold) == certain
    assert parts["certain_fraction"] == (1.0 if certain else 0.0)
    squared = (student_probs(method, unlabelled) - p.view(1, 2, 1, 1)) ** 2
    expected = squared.mean().item() if certain else 0.0  # mean over certain voxels, classes
    weight = 0.1 * method.ramp_weight(step)
    assert parts["consistency"] == pytest.approx(weight * expected, rel=1e-5, abs=1e-12)


def test_cps_target_is_the_other_networks_argmax():
    method = make_method("cps")
    constant_output(method.net_a.final_conv, [2.0, 0.0])  # a says class 0
    constant_output(method.net_b.final_conv, [0.0, 1.0])  # b says class 1
    _, parts = method.training_loss(*make_batches(), TOTAL - 1)
    # a learns class 1 from b: CE = log(1 + e^2); b learns class 0 from a: log(1 + e)
    cross = math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(1.0))
    assert parts["consistency"] == pytest.approx(0.1 * cross, rel=1e-5)


def test_one_ema_step_of_known_weights():
    # SSL4MIS update_ema_variables(..., iter_num) runs before iter_num += 1, so the first
    # step (0) copies the student: decay min(1 - 1 / (step + 1), 0.99).
    method = make_method("mean-teacher")

    def fill(module, value):
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(value)

    def teacher_values():
        return {round(v, 6) for p in method.teacher.parameters() for v in p.flatten().tolist()}

    fill(method.teacher, 0.0)
    fill(method.student, 1.0)
    method.after_step(0)
    assert teacher_values() == {1.0}
    fill(method.student, 3.0)
    method.after_step(1)  # decay 1/2
    assert teacher_values() == {2.0}
    method.after_step(4)  # decay 4/5
    assert teacher_values() == {2.2}
    method.after_step(1000)  # decay 0.99
    assert teacher_values() == {round(0.99 * 2.2 + 0.01 * 3.0, 6)}


def test_simcvd_teacher_sees_its_own_dropout_view():
    method = make_method("simcvd")  # NET has no dropout: view_dropout applies
    method.train()
    method.after_step(0)  # teacher == student: only dropout can tell their views apart
    captured = {}

    def keep(name):
        def hook(module, args, output) -> None:  # returns None: the output stays as it is
            captured.setdefault(name, output.detach().clone())

        return hook

    method.student.unet.body.register_forward_hook(keep("student"))
    method.teacher.unet.body.register_forward_hook(keep("teacher"))
    labelled, unlabelled = make_batches()
    _, parts = method.training_loss(labelled, unlabelled, TOTAL - 1)
    assert parts["contrast"] > 0 and "teacher" in captured
    assert not torch.allclose(captured["teacher"], captured["student"])
    images = torch.cat([labelled.image, unlabelled.image])
    with torch.no_grad():
        without_dropout = method.teacher.eval().unet.body(images)
    assert not torch.allclose(captured["teacher"], without_dropout)
