"""kdops.pilot_sgd_step: bit-exact against the per-tensor loop, exact derivatives to any order,
the registered ops' contract, torch.func transforms, and the pilot_update helper. Every test
that takes the ``backend`` fixture runs on the native CPU kernels and on the portable ones.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.func import hessian as tf_hessian
from torch.func import jacfwd as tf_jacfwd
from torch.func import jacrev as tf_jacrev
from torch.func import jvp as tf_jvp

import kdops
from kdops import _library, _pilot_ops, reference

from conftest import NATIVE

# (weight_decay, momentum, buffers?, dampening, nesterov, maximize)
CONFIGS = [
    (0.0, 0.0, False, 0.0, False, False),
    (0.01, 0.0, False, 0.0, False, True),
    (0.0, 0.9, False, 0.0, False, False),
    (0.05, 0.9, True, 0.0, False, False),
    (0.05, 0.9, True, 0.3, False, True),
    (0.0, 0.9, False, 0.0, True, False),
    (0.05, 0.8, True, 0.0, True, False),
]
CONFIG_IDS = ["plain", "wd-max", "mom-first", "mom-buf", "mom-damp-max", "nest-first",
              "nest-buf"]
SHAPES = [(7, 5), (33,), (3, 4, 5), (1,), (2, 3, 3, 3)]


def tensors(dtypes, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = SHAPES * (len(dtypes) // len(SHAPES) + 1)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dt).requires_grad_(requires_grad)
            for s, dt in zip(shapes, dtypes)]


def kwargs_for(config, params, tensor_scalars=False, dtype=torch.float64, seed=9):
    wd, m, with_buffers, dampening, nesterov, maximize = config
    if tensor_scalars:
        wd = torch.tensor(wd, dtype=dtype, requires_grad=True) if wd else wd
        m = torch.tensor(m, dtype=dtype, requires_grad=True) if m else m
    buffers = tensors([p.dtype for p in params], seed=seed) if with_buffers else None
    return dict(weight_decay=wd, momentum=m, momentum_buffers=buffers, dampening=dampening,
                nesterov=nesterov, maximize=maximize)


MIXED = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float64,
         torch.bfloat16, torch.float32]


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtypes", [[torch.float32] * 5, [torch.bfloat16] * 5, MIXED],
                         ids=["fp32", "bf16", "mixed"])
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_step_is_bit_exact_against_per_tensor_loop(backend, config, dtypes, lr_kind):
    params, grads = tensors(dtypes, seed=1), tensors(dtypes, seed=2)
    kwargs = kwargs_for(config, params, tensor_scalars=lr_kind == "tensor",
                        dtype=torch.float32)
    lr = 0.0123 if lr_kind == "float" else torch.tensor(0.0123)
    before = [p.clone() for p in params]
    out = kdops.pilot_sgd_step(params, grads, lr, **kwargs)
    ref = reference.sgd_step(params, grads, lr, **kwargs)
    for o, r, p, b in zip(out, ref, params, before):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert torch.equal(o, r), (o - r).abs().max()
        assert torch.equal(p, b) and o.data_ptr() != p.data_ptr()


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_autograd_of_the_loop(backend, config, dtype):
    """Tensor gradients bit for bit (the same ops in the same order). The scalar gradients are
    sums over every element of products of those rounded gradients: kdops accumulates them in
    float64, autograd of the loop in the tensors' dtype; both are checked against the float64
    answer to a few units of the dtype's rounding."""
    def inputs_and_kwargs(dt):
        params = tensors([dt] * 5, seed=1, requires_grad=True)
        grads = tensors([dt] * 5, seed=2, requires_grad=True)
        kwargs = kwargs_for(config, params, tensor_scalars=True, dtype=torch.float32)
        for b in kwargs["momentum_buffers"] or []:
            b.requires_grad_()
        lr = torch.tensor(0.05, requires_grad=True)
        scalars = [x for x in (kwargs["weight_decay"], kwargs["momentum"])
                   if isinstance(x, torch.Tensor)]
        inputs = [*params, *grads, *(kwargs["momentum_buffers"] or []), lr, *scalars]
        return params, grads, lr, kwargs, inputs

    def vjp(step, dt):
        params, grads, lr, kwargs, inputs = inputs_and_kwargs(dt)
        out = step(params, grads, lr, **kwargs)
        return torch.autograd.grad(out, inputs, tensors([dt] * len(params), seed=3),
                                   allow_unused=True, materialize_grads=True)

    got, want = vjp(kdops.pilot_sgd_step, dtype), vjp(reference.sgd_step, dtype)
    exact = vjp(reference.sgd_step, torch.float64)
    for i, (g, w, e) in enumerate(zip(got, want, exact)):
        if g.dim() > 0:
            assert torch.equal(g, w), (i, (g - w).abs().max())
        else:
            rtol = 8 * torch.finfo(dtype).eps
            torch.testing.assert_close(g.double(), e.double(), rtol=rtol, atol=rtol)
            torch.testing.assert_close(w.double(), e.double(), rtol=rtol, atol=rtol)


def _flat_step(config, n, with_buffers, impl=kdops.pilot_sgd_step):
    """`impl` (kdops' step or the per-tensor loop) as a function of flat tensors: params,
    grads, buffers (with_buffers), lr, weight decay, momentum."""
    _, _, _, dampening, nesterov, maximize = config

    def step(*xs):
        params, grads = list(xs[:n]), list(xs[n:2 * n])
        buffers = list(xs[2 * n:3 * n]) if with_buffers else None
        lr, wd, m = xs[-3:]
        return tuple(impl(params, grads, lr, weight_decay=wd, momentum=m,
                          momentum_buffers=buffers, dampening=dampening, nesterov=nesterov,
                          maximize=maximize))
    return step


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_gradcheck_and_gradgradcheck_float64(backend, config):
    wd, m, with_buffers, *_ = config
    params = tensors([torch.float64] * 3, seed=1, requires_grad=True)
    grads = tensors([torch.float64] * 3, seed=2, requires_grad=True)
    buffers = tensors([torch.float64] * 3, seed=4, requires_grad=True) if with_buffers else []
    scalars = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.1, wd, m)]
    # A zero weight decay or momentum is off (a number); a tensor always takes its branch.
    scalars = [s if i == 0 or s.item() else 0.0 for i, s in enumerate(scalars)]
    inputs = (*params, *grads, *buffers, *scalars)
    step = _flat_step(config, 3, with_buffers)
    assert torch.autograd.gradcheck(step, inputs)
    assert torch.autograd.gradgradcheck(step, inputs)


def _forward_mode_inputs(config):
    """(flat float64 inputs of `_flat_step`, a tangent for each tensor among them)."""
    wd, m, with_buffers, *_ = config
    lists = [tensors([torch.float64] * 3, seed=seed) for seed in (1, 2, 4)]
    scalars = [torch.tensor(v, dtype=torch.float64) if v else 0.0 for v in (0.1, wd, m)]
    inputs = (*lists[0], *lists[1], *(lists[2] if with_buffers else []), *scalars)
    g = torch.Generator().manual_seed(7)
    tangents = tuple(torch.randn(x.shape, dtype=torch.float64, generator=g)
                     for x in inputs if isinstance(x, torch.Tensor))
    return inputs, tangents


def _tensor_args(step, inputs):
    """`step` as a function of the tensors among `inputs` (the numbers held fixed)."""
    at = [k for k, x in enumerate(inputs) if isinstance(x, torch.Tensor)]

    def of_tensors(*ts):
        xs = list(inputs)
        for k, t in zip(at, ts):
            xs[k] = t
        return step(*xs)
    return of_tensors, tuple(inputs[k] for k in at)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_forward_mode_matches_the_loop(backend, config):
    """torch.func.jvp and forward_ad dual tensors along every tensor input, the learning rate,
    weight decay and momentum included, against forward mode through the per-tensor loop."""
    inputs, tangents = _forward_mode_inputs(config)
    ours, primals = _tensor_args(_flat_step(config, 3, config[2]), inputs)
    loop, _ = _tensor_args(_flat_step(config, 3, config[2], reference.sgd_step), inputs)
    want = tf_jvp(loop, primals, tangents)[1]
    got = tf_jvp(ours, primals, tangents)[1]
    with fwAD.dual_level():
        dual = [fwAD.unpack_dual(y).tangent
                for y in ours(*(fwAD.make_dual(x, d) for x, d in zip(primals, tangents)))]
    for a, b, w in zip(got, dual, want):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(b, w, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_forward_mode_gradcheck(backend, config):
    """Against finite differences: the step's forward mode and the forward mode of its backward
    (forward over reverse, what torch.func.hessian runs). (gradcheck's batched forward check
    runs the legacy vmap, which knows neither the Functions' vmap rules nor a fallback for an
    op returning a list: torch.func.jacfwd batches through the rules, test below.)"""
    inputs, _ = _forward_mode_inputs(config)
    step, primals = _tensor_args(_flat_step(config, 3, config[2]), inputs)
    primals = tuple(x.requires_grad_() for x in primals)
    assert torch.autograd.gradcheck(step, primals, check_forward_ad=True,
                                    check_backward_ad=False, check_batched_forward_grad=False)
    assert torch.autograd.gradgradcheck(step, primals, check_fwd_over_rev=True,
                                        check_rev_over_rev=False, check_undefined_grad=False)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_jacfwd_and_hessian_match_reverse_mode(backend, config):
    """jacfwd (a vmap of jvp) against jacrev, and hessian (jacfwd of jacrev) of a scalar of the
    stepped tensors against jacrev of jacrev, with respect to every tensor input."""
    inputs, _ = _forward_mode_inputs(config)
    step, primals = _tensor_args(_flat_step(config, 3, config[2]), inputs)
    argnums = tuple(range(len(primals)))
    for a, b in zip(tf_jacfwd(step, argnums)(*primals), tf_jacrev(step, argnums)(*primals)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)

    def scalar(*xs):
        return sum((y ** 3).sum() for y in step(*xs))

    got = tf_hessian(scalar, argnums)(*primals)
    want = tf_jacrev(tf_jacrev(scalar, argnums), argnums)(*primals)
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_forward_over_forward_is_refused(backend):
    """Not silently wrong: torch.func would drop the cross terms through the saved inputs."""
    inputs, _ = _forward_mode_inputs(CONFIGS[1])
    step, primals = _tensor_args(_flat_step(CONFIGS[1], 3, False), inputs)
    with pytest.raises(NotImplementedError, match="forward-over-forward"):
        tf_jacfwd(tf_jacfwd(lambda *xs: sum(y.sum() for y in step(*xs)), 6), 7)(*primals)


def test_gradcheck_with_some_inputs_constant(backend):
    params = tensors([torch.float64] * 3, seed=1, requires_grad=True)
    grads = tensors([torch.float64] * 3, seed=2)
    grads[1].requires_grad_()
    buffers = tensors([torch.float64] * 3, seed=4)
    lr = torch.tensor(0.3, dtype=torch.float64)
    m = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    step = _flat_step((0.0, 0.7, True, 0.0, True, False), 3, True)
    inputs = (*params, *grads, *buffers, lr, 0.0, m)
    assert torch.autograd.gradcheck(step, inputs)
    assert torch.autograd.gradgradcheck(step, inputs)


def test_third_order_matches_the_loop(backend):
    """Momentum enters squared (Nesterov with buffers): d³/dm³ of Σ p'³ is not zero."""
    params = tensors([torch.float64] * 3, seed=1)
    grads = tensors([torch.float64] * 3, seed=2)
    buffers = tensors([torch.float64] * 3, seed=4)

    def third(step):
        m = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
        out = step(params, grads, 0.4, momentum=m, momentum_buffers=buffers, nesterov=True)
        y = sum((o ** 3).sum() for o in out)
        for _ in range(3):
            (y,) = torch.autograd.grad(y, m, create_graph=True)
        return y

    torch.testing.assert_close(third(kdops.pilot_sgd_step), third(reference.sgd_step),
                               rtol=1e-12, atol=0)


def _metadistil_meta_gradient(step, dtype=torch.float64):
    """A pilot step on a KD loss whose teacher is learnable, then the quiz loss's gradient to
    the teacher and to the learning rate, through the step (create_graph)."""
    g = torch.Generator().manual_seed(0)
    x, xq = torch.randn(16, 6, generator=g, dtype=dtype), torch.randn(16, 6, generator=g,
                                                                          dtype=dtype)
    yq = torch.randint(0, 5, (16,), generator=g)
    w1 = torch.randn(6, 8, generator=g, dtype=dtype, requires_grad=True)
    w2 = torch.randn(8, 5, generator=g, dtype=dtype, requires_grad=True)
    teacher = torch.randn(6, 5, generator=g, dtype=dtype, requires_grad=True)
    lr = torch.tensor(0.5, dtype=dtype, requires_grad=True)
    student = lambda x, a, b: torch.tanh(x @ a) @ b
    loss = reference.hinton_kd_loss(student(x, w1, w2), x @ teacher, 2.0)
    gw = torch.autograd.grad(loss, (w1, w2), create_graph=True)
    fast = step([w1, w2], gw, lr, weight_decay=0.01, momentum=0.9,
                momentum_buffers=[torch.ones_like(w1), torch.ones_like(w2)])
    quiz = nn.functional.cross_entropy(student(xq, *fast), yq)
    return torch.autograd.grad(quiz, (teacher, lr))


def test_meta_gradient_through_the_step_equals_the_loop(backend):
    got = _metadistil_meta_gradient(kdops.pilot_sgd_step)
    want = _metadistil_meta_gradient(reference.sgd_step)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_opcheck(backend, config):
    wd, m, with_buffers, dampening, nesterov, maximize = config
    params = tensors(MIXED, seed=1)
    params[2] = params[2].transpose(0, 1)                       # a strided parameter
    grads, cot = tensors(MIXED, seed=2), tensors(MIXED, seed=3)
    grads[2], cot[2] = grads[2].transpose(0, 1).contiguous(), cot[2].transpose(0, 1)
    buffers = tensors(MIXED, seed=4) if with_buffers else None
    if buffers is not None:
        buffers[2] = buffers[2].transpose(0, 1).contiguous()
    scalar = lambda v: None if not v else torch.tensor(v, dtype=torch.float64)
    args = (params, grads, buffers, torch.tensor(0.1), scalar(wd), scalar(m), dampening,
            nesterov, maximize)
    torch.library.opcheck(_pilot_ops.pilot_sgd_step, (*args, [True, False, True]))
    mask = [True, True, with_buffers, True, bool(wd), bool(m)]
    torch.library.opcheck(_pilot_ops.pilot_sgd_step_backward, (cot, *args, mask))


def test_func_grad_and_vmap_over_tasks(backend):
    params = tensors([torch.float32] * 3, seed=1)
    tasks = 4
    per_task = [tensors([torch.float32] * 3, seed=10 + i) for i in range(tasks)]
    task_grads = [torch.stack([grads[j] for grads in per_task]) for j in range(3)]
    lrs = torch.rand(tasks) + 0.1

    def meta(lr, grads, step):
        new = step(params, grads, lr, momentum=0.9, weight_decay=0.1)
        return sum((x ** 2).sum() for x in new)

    for in_dims in [(None, 0), (0, 0)]:
        lr = lrs if in_dims[0] == 0 else torch.tensor(0.3)
        got = vmap(grad(meta, argnums=(0, 1)), in_dims=(*in_dims, None))(
            lr, task_grads, kdops.pilot_sgd_step)
        want = vmap(grad(meta, argnums=(0, 1)), in_dims=(*in_dims, None))(
            lr, task_grads, reference.sgd_step)
        torch.testing.assert_close(got, want)
        out = vmap(lambda l, g: kdops.pilot_sgd_step(params, g, l), in_dims=in_dims)(
            lr, task_grads)
        ref = vmap(lambda l, g: reference.sgd_step(params, g, l), in_dims=in_dims)(
            lr, task_grads)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    second = grad(grad(meta))(torch.tensor(0.3), [t[0] for t in task_grads], kdops.pilot_sgd_step)
    want = grad(grad(meta))(torch.tensor(0.3), [t[0] for t in task_grads], reference.sgd_step)
    torch.testing.assert_close(second, want)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3))) * self.frozen


def test_pilot_update_fast_weights_and_buffers(backend):
    torch.manual_seed(0)
    net = _Net().train()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    teacher_scale = torch.tensor(1.5, requires_grad=True)
    loss = nn.functional.cross_entropy(net(x) * teacher_scale, y)
    stats = {k: v.clone() for k, v in net.named_buffers()}
    fast = kdops.pilot_update(net, loss, 0.1, momentum=0.0)
    assert set(fast) == {n for n, _ in net.named_parameters()} | {n for n, _ in
                                                                   net.named_buffers()}
    assert fast["frozen"] is net.frozen
    (gw,) = torch.autograd.grad(loss, [net.conv.weight], retain_graph=True)
    torch.testing.assert_close(fast["conv.weight"], net.conv.weight - 0.1 * gw)
    quiz = nn.functional.cross_entropy(functional_call(net, fast, (x,)), y)
    for name, value in net.named_buffers():
        assert torch.equal(value, stats[name]), name           # the real model is untouched
    assert not torch.equal(fast["bn.running_mean"], stats["bn.running_mean"])
    (meta,) = torch.autograd.grad(quiz, teacher_scale)          # through the step
    assert meta.abs() > 0


def test_none_grads_pass_params_through(backend):
    params = tensors([torch.float32] * 3, seed=1)
    grads = tensors([torch.float32] * 3, seed=2)
    out = kdops.pilot_sgd_step(params, [grads[0], None, grads[2]], 0.1, weight_decay=0.1)
    assert out[1] is params[1]
    assert torch.equal(out[2], reference.sgd_step(params[2:], grads[2:], 0.1,
                                                  weight_decay=0.1)[0])
    assert kdops.pilot_sgd_step([params[0]], [None], 0.1) == [params[0]]


def test_compiled_step(backend):
    params = tensors([torch.float32] * 3, seed=1, requires_grad=True)
    grads = tensors([torch.float32] * 3, seed=2)
    lr = torch.tensor(0.2, requires_grad=True)

    def meta(lr):
        new = kdops.pilot_sgd_step(params, grads, lr, momentum=0.5)
        return sum((x ** 2).sum() for x in new)

    compiled = torch.compile(meta, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(lr), lr),
                               torch.autograd.grad(meta(lr), lr))


@pytest.mark.skipif(not NATIVE, reason="kdops._C is not built (KDOPS_NO_EXTENSION=1)")
def test_native_kernels_match_portable_with_any_thread_count():
    """Several chunks per tensor (kChunk = 32768 elements): bitwise equal with 1 and 2 threads
    and to the portable implementation; the float64 scalar sums to rounding."""
    params = tensors(MIXED, seed=1) + [torch.randn(70001), torch.randn(300, 400).bfloat16()]
    grads = tensors(MIXED, seed=2) + [torch.randn(70001), torch.randn(300, 400).bfloat16()]
    buffers = [torch.randn_like(p) for p in params]
    cot = [torch.randn_like(p) for p in params]

    def run():
        ps = [p.detach().requires_grad_() for p in params]
        gs = [g.detach().requires_grad_() for g in grads]
        bs = [b.detach().requires_grad_() for b in buffers]
        lr, wd, m = (torch.tensor(v, dtype=torch.float64, requires_grad=True)
                     for v in (0.1, 0.01, 0.9))
        out = kdops.pilot_sgd_step(ps, gs, lr, weight_decay=wd, momentum=m, momentum_buffers=bs,
                                   nesterov=True)
        return out + list(torch.autograd.grad(out, ps + gs + bs + [lr, wd, m], cot))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    with _library.portable_on_cpu():
        portable = run()
    assert kdops.backend_info()["pilot_sgd_step"]["cpu"] == "native"
    for a, b, c in zip(one, two, portable):
        assert torch.equal(a, b)
        if a.dim() > 0:
            assert torch.equal(a, c)
        else:
            torch.testing.assert_close(a, c, rtol=1e-12, atol=0)


@pytest.mark.parametrize("call,error,match", [
    (lambda p, g: kdops.pilot_sgd_step(p, g[:1], 0.1), ValueError, "grads has 1"),
    (lambda p, g: kdops.pilot_sgd_step(p, [x.double() for x in g], 0.1), ValueError,
     r"grads\[0\]"),
    (lambda p, g: kdops.pilot_sgd_step(p, [x[:1] for x in g], 0.1), ValueError, r"grads\[0\]"),
    (lambda p, g: kdops.pilot_sgd_step([x.long() for x in p], g, 0.1), TypeError, "floating"),
    (lambda p, g: kdops.pilot_sgd_step(p, g, -0.1), ValueError, "lr"),
    (lambda p, g: kdops.pilot_sgd_step(p, g, float("nan")), ValueError, "lr"),
    (lambda p, g: kdops.pilot_sgd_step(p, g, "0.1"), TypeError, "lr"),
    (lambda p, g: kdops.pilot_sgd_step(p, g, torch.ones(2)), ValueError, "lr"),
    (lambda p, g: kdops.pilot_sgd_step(p, g, 0.1, momentum=-1.0), ValueError, "momentum"),
    (lambda p, g: kdops.pilot_sgd_step(p, g, 0.1, nesterov=True), ValueError, "nesterov"),
    (lambda p, g: kdops.pilot_sgd_step(p, g, 0.1, momentum=0.9, dampening=2.0), ValueError,
     "dampening"),
    (lambda p, g: kdops.pilot_sgd_step(p, g, 0.1, momentum=0.9, momentum_buffers=g[:1]),
     ValueError, "momentum_buffers"),
    (lambda p, g: kdops.pilot_update(p, g[0].sum(), 0.1), TypeError, "nn.Module"),
])
def test_bad_arguments_raise(call, error, match):
    params, grads = tensors([torch.float32] * 2, seed=1), tensors([torch.float32] * 2, seed=2)
    with pytest.raises(error, match=match):
        call(params, grads)


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtypes", [[torch.float32] * 5, [torch.bfloat16] * 5, MIXED],
                         ids=["fp32", "bf16", "mixed"])
@pytest.mark.parametrize("lr_where", ["float", "cpu", "cuda"])
def test_cuda_step_and_backward_match_cpu(config, dtypes, lr_where):
    """The CUDA kernels compute the CPU kernels' values bit for bit (same roundings), with the
    step sizes as numbers, CPU tensors or device tensors."""
    params = tensors(dtypes, seed=1) + [torch.randn(70001), torch.randn(300, 401).bfloat16()]
    grads = tensors(dtypes, seed=2) + [torch.randn(70001), torch.randn(300, 401).bfloat16()]
    params[2] = params[2].transpose(0, 1)
    grads[2] = grads[2].transpose(0, 1).contiguous()
    cot = [torch.randn_like(p) for p in params]
    kwargs = kwargs_for(config, params, tensor_scalars=lr_where != "float")
    if kwargs["momentum_buffers"] is not None:
        kwargs["momentum_buffers"] = [torch.randn_like(p) for p in params]

    def run(device):
        move = lambda xs: None if xs is None else [x.to(device).requires_grad_() for x in xs]
        ps, gs, bs = move(params), move(grads), move(kwargs["momentum_buffers"])
        scalar_device = device if lr_where == "cuda" else "cpu"
        lr = 0.05 if lr_where == "float" else torch.tensor(0.05, device=scalar_device,
                                                            requires_grad=True)
        extra = {k: (v.detach().to(scalar_device).requires_grad_()
                     if isinstance(v, torch.Tensor) else v)
                 for k, v in kwargs.items() if k in ("weight_decay", "momentum")}
        out = kdops.pilot_sgd_step(ps, gs, lr, **{**kwargs, **extra, "momentum_buffers": bs})
        inputs = ps + gs + (bs or []) + [x for x in [lr, *extra.values()]
                                         if isinstance(x, torch.Tensor)]
        grads_in = torch.autograd.grad(out, inputs, [c.to(device) for c in cot],
                                       allow_unused=True, materialize_grads=True)
        return [x.detach().cpu() for x in (*out, *grads_in)]

    for a, b in zip(run("cpu"), run("cuda")):
        if a.dim() > 0:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
def test_cuda_step_is_one_kernel_launch_per_direction():
    params = [p.cuda().requires_grad_() for p in tensors([torch.float32] * 200, seed=1)]
    grads = [g.cuda().requires_grad_() for g in tensors([torch.float32] * 200, seed=2)]
    cot = [torch.ones_like(p) for p in params]
    kdops.pilot_sgd_step(params, grads, 0.1)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = kdops.pilot_sgd_step(params, grads, 0.1)
        torch.autograd.grad(out, params + grads, cot)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("step_kernel" in k for k in kernels) == 1, kernels
    assert sum("backward_kernel" in k for k in kernels) == 1, kernels
