"""kdops.meta: the teacher's (and the temperatures') meta-gradient through a pilot step, in
every mode, against a plain create_graph implementation over the reference loss and the
per-tensor update, in float64 on an MLP (with dropout) and a small CNN with BatchNorm; and the
MetaDistil step.
"""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import kdops
from kdops import meta, reference

CLASSES = 5


def mlp(seed, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout),
                         nn.Linear(16, CLASSES)).double()


def cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES)).double()


def batches(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (12, 6) if kind == "mlp" else (12, 3, 6, 6)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    xq = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (12,), generator=g)
    yq = torch.randint(0, CLASSES, (12,), generator=g)
    return x, y, xq, yq


def nets(kind):
    if kind == "mlp":
        return mlp(0, dropout=0.2), mlp(1)
    return cnn(0), cnn(1)


def plain_meta_gradient(student, teacher, x, y, xq, yq, lr, tau, step, kd):
    """What users write today: create_graph through the student, reference.kd_loss and the
    per-tensor SGD update."""
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    pilot = reference.kd_loss(student(x), teacher(x), temperature=tau, labels=y, **kd)
    grads = torch.autograd.grad(pilot, params, create_graph=True)
    fast = reference.sgd_step(params, grads, lr, **step)
    with meta.frozen_batch_norm_stats(student):
        quiz = F.cross_entropy(functional_call(student, {n: p for (n, _), p in
                                                         zip(named, fast)}, (xq,)), yq)
    return torch.autograd.grad(quiz, [*teacher.parameters(), tau])


STEPS = {
    "sgd": {},
    "momentum-wd": dict(weight_decay=0.01, momentum=0.9, dampening=0.1),
    "nesterov-buffers": dict(weight_decay=0.01, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("step_name", list(STEPS))
@pytest.mark.parametrize("mode", ["jvp", "jvp-recompute", "autograd"])
def test_meta_gradient_matches_plain_create_graph(kind, step_name, mode):
    mode, _, recompute = mode.partition("-")
    x, y, xq, yq = batches(kind)
    kd = dict(alpha=0.7, divergence="kl")
    step = dict(STEPS[step_name])
    runs = []
    for impl in ("plain", mode):
        student, teacher = nets(kind)
        if step_name == "nesterov-buffers":
            step["momentum_buffers"] = [torch.full_like(p, 0.1) for p in student.parameters()]
        tau = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(7)                                  # the same dropout masks
        if impl == "plain":
            grads = plain_meta_gradient(student, teacher, x, y, xq, yq, 0.3, tau, step, kd)
        else:
            out = meta.meta_gradient(student, teacher(x), x, y, xq, yq,
                                     [*teacher.parameters(), tau], lr=0.3, mode=mode,
                                     recompute_student=bool(recompute), temperature=tau,
                                     **step, **kd)
            grads = out["meta_grads"]
        runs.append((grads, {k: v.clone() for k, v in student.named_buffers()}))
    (want, want_buffers), (got, got_buffers) = runs
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
    assert any(w.abs().max() > 1e-6 for w in want)          # not trivially zero
    for name in want_buffers:                                 # running stats moved once
        torch.testing.assert_close(got_buffers[name], want_buffers[name], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_finite_difference_agrees_to_second_order(kind):
    x, y, xq, yq = batches(kind, seed=3)
    results = {}
    for mode, eps in (("jvp", None), ("finite_difference", 1e-2), ("finite_difference", 1e-3)):
        student, teacher = nets(kind)
        torch.manual_seed(7)
        out = meta.meta_gradient(student, teacher(x), x, y, xq, yq, list(teacher.parameters()),
                                 lr=0.3, mode=mode, fd_eps=eps or 1e-3, temperature=2.0)
        results[(mode, eps)] = torch.cat([g.flatten() for g in out["meta_grads"]])
    exact = results[("jvp", None)]
    err = [(results[("finite_difference", e)] - exact).norm() / exact.norm() for e in (1e-2,
                                                                                    1e-3)]
    assert err[1] < 1e-7, err
    assert err[1] < err[0] / 30, err                          # O(ε²): 100× for 10× smaller ε


@pytest.mark.parametrize("recompute", [False, True])
def test_metadistil_step_modes_agree_and_update_each_network_once(recompute):
    x, y, xq, yq = batches("cnn", seed=5)
    states = []
    for mode in ("autograd", "jvp"):
        student, teacher = nets("cnn")
        s_opt = torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
        t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
        before = copy.deepcopy((student.state_dict(), teacher.state_dict()))
        for _ in range(2):                                     # the second uses the buffers
            out = meta.metadistil_step(student, teacher, s_opt, t_opt, x, y, xq, yq, mode=mode,
                                       recompute_student=recompute and mode == "jvp",
                                       temperature=3.0, alpha=0.5, pilot_lr=0.15)
        assert set(out) == {"loss", "pilot_loss", "quiz_loss"}
        states.append((student.state_dict(), teacher.state_dict()))
    (s_a, t_a), (s_j, t_j) = states
    for a, j in ((s_a, s_j), (t_a, t_j)):
        for name in a:
            torch.testing.assert_close(j[name], a[name], rtol=1e-9, atol=1e-12)
    assert not torch.equal(t_j["0.weight"], before[1]["0.weight"])
    assert not torch.equal(s_j["0.weight"], before[0]["0.weight"])
    assert s_j["1.num_batches_tracked"] == 2 and t_j["1.num_batches_tracked"] == 2


@pytest.mark.parametrize("parametrization", ["log", "ctkd"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("mode", ["jvp", "autograd"])
def test_temperature_meta_gradient_matches_plain_create_graph(parametrization, per_sample, mode):
    x, y, xq, yq = batches("cnn", seed=2)
    grads = []
    for impl in ("plain", mode):
        student, teacher = nets("cnn")
        temperature = kdops.LearnableTemperature(3.0, parametrization=parametrization,
                                                 per_sample=per_sample,
                                                 num_classes=CLASSES).double()
        if per_sample:                                        # a head that is not constant
            torch.manual_seed(3)
            nn.init.normal_(temperature.head.weight, std=0.3)
        params = list(temperature.parameters())
        with torch.no_grad():
            t = teacher(x)
        tau = temperature(t)
        assert tau.shape == ((12,) if per_sample else ())
        kd = dict(temperature=tau, alpha=0.6, divergence="jsd", beta=0.3)
        if impl == "plain":
            named = [(n, p) for n, p in student.named_parameters()]
            pilot = reference.kd_loss(student(x), t, labels=y, **kd)
            g = torch.autograd.grad(pilot, [p for _, p in named], create_graph=True)
            fast = reference.sgd_step([p for _, p in named], g, 0.2, momentum=0.5)
            with meta.frozen_batch_norm_stats(student):
                quiz = F.cross_entropy(functional_call(student, {n: f for (n, _), f in
                                                                 zip(named, fast)}, (xq,)), yq)
            grads.append(torch.autograd.grad(quiz, params))
        else:
            grads.append(meta.meta_gradient(student, t, x, y, xq, yq, params, lr=0.2,
                                            momentum=0.5, mode=mode, **kd)["meta_grads"])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-13)
        assert want.abs().max() > 1e-9


def test_mkd_step_moves_the_temperature_and_the_student():
    x, y, xq, yq = batches("mlp", seed=4)
    student, teacher = nets("mlp")
    temperature = kdops.LearnableTemperature(4.0).double()
    s_opt = torch.optim.SGD(student.parameters(), lr=0.2)
    tau_opt = torch.optim.Adam(temperature.parameters(), lr=0.05)
    before = [p.detach().clone() for p in student.parameters()]
    out = meta.mkd_step(student, teacher, temperature, s_opt, tau_opt, x, y, xq, yq, alpha=0.5,
                        pilot_lr=0.05)
    assert out["temperature"] != 4.0 and out["temperature"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_temperature_arguments_are_checked():
    with pytest.raises(ValueError, match="parametrization"):
        kdops.LearnableTemperature(2.0, parametrization="linear")
    with pytest.raises(ValueError, match="ctkd"):
        kdops.LearnableTemperature(0.5, parametrization="ctkd")
    with pytest.raises(ValueError, match="num_classes"):
        kdops.LearnableTemperature(2.0, per_sample=True)
    tau = kdops.LearnableTemperature(7.0, parametrization="ctkd")(torch.randn(3, 4))
    torch.testing.assert_close(tau, torch.tensor(7.0))


def test_bad_mode_raises():
    student, teacher = nets("mlp")
    x, y, xq, yq = batches("mlp")
    with pytest.raises(ValueError, match="mode"):
        meta.meta_gradient(student, teacher(x), x, y, xq, yq, list(teacher.parameters()),
                           lr=0.1, mode="hessian")
    with pytest.raises(ValueError, match="recompute_student"):
        meta.meta_gradient(student, teacher(x), x, y, xq, yq, list(teacher.parameters()),
                           lr=0.1, mode="autograd", recompute_student=True)



def test_frozen_batch_norm_stats_uses_batch_statistics_and_restores_the_buffers():
    net = nn.Sequential(cnn(0), nn.BatchNorm1d(CLASSES).double())
    x = batches("cnn")[0]
    net(x)                                    # the running statistics move off their start
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    before = [[m.running_mean, m.running_var, m.num_batches_tracked] for m in layers]
    values = [[b.clone() for b in bufs] for bufs in before]
    want = net(x).detach()                    # train mode: batch statistics
    for bufs, vals in zip(before, values):    # that forward moved them: put them back
        for b, v in zip(bufs, vals):
            b.copy_(v)
    with pytest.raises(KeyError), meta.frozen_batch_norm_stats(net):
        torch.testing.assert_close(net(x), want, rtol=0, atol=0)
        assert all(m.running_mean is None and m.num_batches_tracked is None for m in layers)
        raise KeyError("the block fails: the buffers still come back")
    for m, bufs, vals in zip(layers, before, values):
        after = [m.running_mean, m.running_var, m.num_batches_tracked]
        assert all(a is b for a, b in zip(after, bufs))
        for a, v in zip(after, vals):
            torch.testing.assert_close(a, v, rtol=0, atol=0)
    assert set(net.state_dict()) == {k for k, _ in net.named_buffers()} | {
        k for k, _ in net.named_parameters()}

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cuda_step_args(recompute=False):
    student, teacher = (net.cuda() for net in nets("cnn"))
    s_opt = torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
    return student, teacher, s_opt, t_opt, *(t.cuda() for t in batches("cnn", seed=5))


def _same_state(nets, others):
    for net, other in zip(nets, others):
        for (name, a), b in zip(net.state_dict().items(), other.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_captured_step_checks_its_arguments():
    with pytest.raises(ValueError, match="warmup"):
        meta.CapturedStep(lambda x: x, warmup=0)
    with pytest.raises(ValueError, match="CUDA tensors, got one on cpu"):
        meta.CapturedStep(lambda x: x)(torch.ones(2))


def test_captured_step_outputs_are_copies_through_containers():
    from collections import namedtuple

    from kdops.meta.captured import _copied
    pair = namedtuple("pair", "a b")
    x = torch.arange(3.0)
    out = _copied({"d": [x, (x, pair(x, 1))], "n": None})
    leaves = [out["d"][0], out["d"][1][0], out["d"][1][1].a]
    assert isinstance(out["d"][1][1], pair) and out["d"][1][1].b == 1 and out["n"] is None
    assert all(torch.equal(t, x) and t.data_ptr() != x.data_ptr() for t in leaves)


@CUDA
def test_captured_metadistil_step_replays_as_eager_steps_run():
    """Captured after its warm-up calls, a "jvp" step (the student's graph read, the loss'
    Triton kernels, the pilot step's kernel, both optimizers) replays as eager steps run: the
    parameters and BatchNorm statistics of both networks agree after two calls of each, and
    so do the outputs of the first call, which the second replay did not overwrite."""
    args, kd = _cuda_step_args(), dict(temperature=3.0, alpha=0.5)
    step = meta.CapturedStep(functools.partial(meta.metadistil_step, *args[:4], **kd),
                             optimizers=args[2:4])
    batch = args[4:]
    for _ in range(3):
        step(*batch)
    twin = copy.deepcopy(args[:4])
    before = copy.deepcopy(args[1].state_dict())
    got = [step(*batch) for _ in range(2)]
    want = [meta.metadistil_step(*twin, *batch, **kd) for _ in range(2)]
    assert not torch.equal(args[1].state_dict()["0.weight"], before["0.weight"])
    _same_state(args[:2], twin[:2])
    for g, w in zip(got, want):
        for key in w:
            torch.testing.assert_close(g[key], w[key], rtol=1e-9, atol=1e-12, msg=key)


@CUDA
def test_captured_step_follows_learning_rates_batch_shapes_and_replaced_state():
    """A scheduler's new learning rate and replaced momentum buffers make the next call capture
    again, as `recapture()` does after a buffer is replaced; a smaller batch runs eagerly: each
    time the networks agree with eager steps."""
    args, kd = _cuda_step_args(), dict(temperature=3.0, alpha=0.5)
    step = meta.CapturedStep(functools.partial(meta.metadistil_step, *args[:4], **kd),
                             optimizers=args[2:4], warmup=1)
    batch = args[4:]
    step(*batch)
    twin = copy.deepcopy(args[:4])

    def both(*b):
        step(*b)
        meta.metadistil_step(*twin, *b, **kd)

    both(*batch)
    for opt in (args[2], twin[2]):
        opt.param_groups[0]["lr"] = 0.05
    both(*batch)
    both(*(x[:8] for x in batch))
    for opt in (args[2], twin[2]):
        for state in opt.state.values():
            state["momentum_buffer"] = state["momentum_buffer"].clone()
    both(*batch)
    for net in (args[0], twin[0]):                # buffers the optimizers do not hold
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean = m.running_mean.clone()
    step.recapture()
    both(*batch)
    both(*batch)
    _same_state(args[:2], twin[:2])


@CUDA
def test_capture_refuses_a_second_student_forward():
    """Replaying its dropout masks would set the CUDA generators' state while capturing."""
    args = _cuda_step_args()
    step = meta.CapturedStep(functools.partial(meta.metadistil_step, *args[:4],
                                               recompute_student=True, temperature=3.0),
                             warmup=1)
    step(*args[4:])
    with pytest.raises(RuntimeError, match="inside CUDA graph capture"):
        step(*args[4:])


@CUDA
@pytest.mark.filterwarnings("ignore:This instance was constructed with capturable=True")
def test_captured_mkd_step_replays_as_eager_steps_run():
    """Captured, an MKD step (the temperature's optimizer an Adam with capturable=True, as
    capture needs) replays as eager steps run."""
    batch = tuple(t.cuda() for t in batches("mlp", seed=4))
    temperature = kdops.LearnableTemperature(4.0, per_sample=True, num_classes=CLASSES)
    args = (mlp(0).cuda(), mlp(1).cuda(), temperature.double().cuda())
    args += (torch.optim.SGD(args[0].parameters(), lr=0.2),
             torch.optim.Adam(args[2].parameters(), lr=0.05, capturable=True))
    kd = dict(alpha=0.5, pilot_lr=0.05)
    step = meta.CapturedStep(functools.partial(meta.mkd_step, *args, **kd),
                             optimizers=args[3:])
    for _ in range(3):
        step(*batch)
    twin = copy.deepcopy(args)
    before = copy.deepcopy(args[2].state_dict())
    for _ in range(2):
        step(*batch)
        meta.mkd_step(*twin, *batch, **kd)
    assert not torch.equal(args[2].rho, before["rho"])
    _same_state((args[0], args[2]), (twin[0], twin[2]))
