"""kdops.meta.tangent.TangentTape: the JVP of a recorded forward, against torch.func.jvp of a
second forward (float64, train-mode networks), and its refusals."""
import copy
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from kdops import meta
from kdops.meta.tangent import TangentTape, UnsupportedForward

DEVICES = ["cpu", "cuda"]


class ResidualBlock(nn.Module):
    """torchvision's pattern: in-place ReLU, `out += identity`, an affine-free batch norm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6, affine=False)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        identity = out
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return self.fc(F.adaptive_avg_pool2d(self.up(out), 1).flatten(1))


class Mixer(nn.Module):
    """Sequence model: layer norm, GELU, SiLU, sigmoid gate, tanh, dropout, matmul, split, and
    a concatenation with an untracked tensor."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.ff = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(22, 5)

    def forward(self, x):
        h = self.norm(self.embed(x))
        a, b = self.drop(F.gelu(self.ff(h))).split(16, dim=-1)
        mixed = torch.sigmoid(a) * F.silu(b) + torch.tanh(h) @ torch.eye(16, dtype=h.dtype,
                                                                          device=h.device)
        return self.out(torch.cat([x, mixed], -1).mean(1)) / 3 - 1


class Attention(nn.Module):
    """A self-attention layer through the fused kernel (F.scaled_dot_product_attention), causal
    or with an additive mask `bias` (a buffer), and a reshape of its transposed output."""

    def __init__(self, dropout=0.0, bias=None):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.qkv = nn.Linear(16, 48)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 5)
        self.dropout = dropout
        self.register_buffer("bias", bias)

    def forward(self, x):
        h = self.embed(x)
        q, k, v = (t.transpose(1, 2) for t in self.qkv(h).view(*x.shape[:2], 3, 2, 8).unbind(2))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias,
                                           is_causal=self.bias is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        h = self.norm(h + a.transpose(1, 2).reshape(*x.shape[:2], 16))
        return self.out(h[:, 0] + h.mean(1))


def clamped():
    """MobileNet's in-place ReLU6, an in-place leaky ReLU, an out-of-place one with a negative
    slope, max pooling."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6(inplace=True),
                        nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
                        nn.MaxPool2d(2), nn.LeakyReLU(-0.5), nn.Flatten(),
                        nn.Linear(4 * 9, 5))
    with torch.no_grad():
        net[0].weight.mul_(20)                   # outputs on both sides of ReLU6's [0, 6]
    return net


def eval_batch_norm():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                        nn.Linear(4 * 16, 5))
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    net[1].eval()
    return net


NETS = {
    "residual": (ResidualBlock, (4, 3, 6, 6)),
    "mixer": (Mixer, (4, 7, 6)),
    "eval_batch_norm": (eval_batch_norm, (4, 3, 6, 6)),
    "clamped": (clamped, (4, 3, 6, 6)),
    "attention": (Attention, (4, 7, 6)),
    "attention_dropout": (lambda: Attention(dropout=0.3), (4, 7, 6)),
}


def _device(name):
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(name)


def _recorded_and_reference(net, x, sources, tangents):
    """(tape's JVP of the recorded forward, torch.func.jvp of a second forward with the same
    random draws and batch statistics)."""
    state = torch.random.get_rng_state(), (torch.cuda.get_rng_state()
                                           if x.is_cuda else None)
    tape = TangentTape(sources)
    with tape:
        out = net(x)
    got = tape.jvp(out, tangents)
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])
    names = {p: n for n, p in net.named_parameters()}
    frozen = {n: p for n, p in net.named_parameters() if p not in set(sources)}

    def forward(*params):
        return functional_call(net, {**frozen, **{names[p]: q for p, q in zip(sources, params)}},
                               (x,))

    # torch.func.jvp has no rule for the fused attention kernels: the math one for it.
    with meta.frozen_batch_norm_stats(net), sdpa_kernel(SDPBackend.MATH):
        want = jvp(forward, tuple(p.detach() for p in sources), tuple(tangents))[1]
    return got, want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("sources", ["all", "weights", "vectors"])
def test_tape_jvp_matches_a_second_forward(name, sources, device):
    device = _device(device)
    build, shape = NETS[name]
    torch.manual_seed(0)
    net = build().double().to(device)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    params = list(net.parameters())
    if sources != "all":          # weights alone, or biases, γ and β alone (as BitFit trains)
        for p in params:
            p.requires_grad_((p.dim() > 1) == (sources == "weights"))
        params = [p for p in params if p.requires_grad]
    tangents = [torch.randn_like(p) for p in params]
    got, want = _recorded_and_reference(net, x, params, tangents)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_tape_keeps_the_forward_differentiable_and_its_statistics_moving():
    torch.manual_seed(1)
    net = ResidualBlock().double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    ref = ResidualBlock().double()
    ref.load_state_dict(net.state_dict())
    with TangentTape(list(net.parameters())):
        out = net(x)
    want = ref(x)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(net.bn1.running_mean, ref.bn1.running_mean, rtol=0, atol=0)
    grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
    want_grads = torch.autograd.grad(want.square().sum(), list(ref.parameters()))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


class InPlaceScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return self.lin(x).mul_(2)


class ChangedAfterRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        h = torch.tanh(self.lin(x))              # tanh's derivative reads its output ...
        out = h * 3
        h.add_(1)                                # ... which is then changed
        return out


class OutsideInput(nn.Module):
    def __init__(self, extra):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.extra = extra

    def forward(self, x):
        return self.lin(x) * self.extra


class ConstantOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return x.sum(1, keepdim=True).expand(-1, 4).clone()


class NegativeSlopeInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.act = nn.LeakyReLU(-0.5, inplace=True)   # its output no longer tells x's sign

    def forward(self, x):
        return self.act(self.lin(x))


REFUSALS = {
    "in_place_without_rule": (InPlaceScale, "no tangent rule for aten.mul_"),
    "changed_after_read": (ChangedAfterRead, "changed in place later"),
    "requires_grad_from_outside": (lambda: OutsideInput(torch.ones(4, requires_grad=True)),
                                   "not computed by the recorded operators"),
    "output_free_of_sources": (ConstantOutput, "not computed from the sources"),
    "rule_fails": (NegativeSlopeInPlace, "tangent of aten.leaky_relu_"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_tape_refuses_what_it_cannot_replay(case):
    build, message = REFUSALS[case]
    net = build()
    params = list(net.parameters())
    tape = TangentTape(params)
    with tape:
        out = net(torch.randn(2, 3))
    with pytest.raises(UnsupportedForward, match=message):
        tape.jvp(out, [torch.ones_like(p) for p in params])


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16),
                                          ("cuda", torch.float32), ("cuda", torch.bfloat16)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_tape_jvp_through_a_fused_attention_kernel(device, dtype, with_bias):
    """float32 and bfloat16, where the dispatcher picks a fused kernel (CPU flash; on an H100
    memory-efficient for float32, cuDNN for bfloat16), with and without an additive mask."""
    device = _device(device)
    torch.manual_seed(2)
    net = Attention(bias=torch.randn(7, 7) if with_bias else None).to(device, dtype)
    x = torch.randn(4, 7, 6, device=device, dtype=dtype)
    params = list(net.parameters())
    tangents = [torch.randn_like(p) for p in params]
    tape = TangentTape(params)
    with tape:
        out = net(x)
    got = tape.jvp(out, tangents)
    # The reference: a float32 copy through the math kernel.
    twin = copy.deepcopy(net).float()
    names = [n for n, _ in twin.named_parameters()]
    with sdpa_kernel(SDPBackend.MATH):
        want = jvp(lambda *ps: functional_call(twin, dict(zip(names, ps)), (x.float(),)),
                   tuple(p.detach() for p in twin.parameters()),
                   tuple(t.float() for t in tangents))[1]
    assert got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2 * want.abs().max().item()
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_tape_refuses_the_dropout_of_a_fused_attention_kernel():
    """In float64 (above) attention dropout runs in the math path, whose masks the tape
    records; a fused CUDA kernel draws its own."""
    device = _device("cuda")
    net = Attention(dropout=0.5).to(device)
    params = list(net.parameters())
    tape = TangentTape(params)
    with tape:
        out = net(torch.randn(2, 7, 6, device=device))
    with pytest.raises(UnsupportedForward, match="attention dropout"):
        tape.jvp(out, [torch.ones_like(p) for p in params])


def test_tape_is_freed_with_its_last_reference():
    net = nn.Linear(3, 2)
    tape = TangentTape(list(net.parameters()))
    with tape:
        net(torch.randn(2, 3))
    alive = weakref.ref(tape)
    del tape
    assert alive() is None                      # no cycle waiting for the garbage collector


def test_tape_checks_its_sources_and_tangents():
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="listed twice"):
        TangentTape([net.weight, net.bias, net.weight])
    tape = TangentTape(list(net.parameters()))
    with tape:
        out = net(torch.randn(2, 3))
    assert not hasattr(net.weight, "_kdops_tangent_slot")     # no trace left on the sources
    with pytest.raises(ValueError, match="1 tangents for 2 sources"):
        tape.jvp(out, [torch.ones(2, 3)])


def _counting(net):
    calls = []
    net.register_forward_hook(lambda *args: calls.append(1))
    return calls


def _meta_grads(student, teacher, mode, **kwargs):
    torch.manual_seed(3)
    x, xq = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    y, yq = torch.randint(0, 4, (6,)), torch.randint(0, 4, (6,))
    out = meta.meta_gradient(student, teacher(x), x, y, xq, yq, list(teacher.parameters()),
                             lr=0.2, mode=mode, temperature=2.0, **kwargs)
    return out["meta_grads"]


def test_jvp_mode_runs_the_student_forward_once_at_theta():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 4).double(), nn.Linear(3, 4).double()
    calls = _counting(student)
    jvp_grads = _meta_grads(student, teacher, "jvp")
    assert len(calls) == 2                   # the pilot's forward and the quiz's, nothing more
    for got, want in zip(jvp_grads, _meta_grads(student, teacher, "autograd")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_recompute_student_runs_it_again_after_the_quiz_and_agrees():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 4).double(), nn.Linear(3, 4).double()
    calls = _counting(student)
    grads = _meta_grads(student, teacher, "jvp", recompute_student=True)
    assert len(calls) == 3
    for got, want in zip(grads, _meta_grads(student, teacher, "autograd")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_jvp_mode_falls_back_to_a_second_forward_with_a_warning():
    torch.manual_seed(0)
    student, teacher = InPlaceScale().double(), nn.Linear(3, 4).double()
    calls = _counting(student)
    with pytest.warns(UserWarning, match="no tangent rule for aten.mul_"):
        jvp_grads = _meta_grads(student, teacher, "jvp")
    assert len(calls) == 3
    for got, want in zip(jvp_grads, _meta_grads(student, teacher, "autograd")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_attention_student_meta_gradient_through_the_fused_kernel():
    """The fused CPU/CUDA attention kernels have no double backward (mode="autograd" fails
    with them) and no forward-mode rule (torch.func.jvp fails): the tape gives the exact
    meta-gradient, equal to "autograd" through the math kernel."""
    def run(mode, backend):
        torch.manual_seed(0)
        student, teacher = Attention().double(), Attention().double()
        x, xq = torch.randn(2, 4, 7, 6, dtype=torch.float64).unbind()
        y, yq = torch.randint(0, 5, (2, 4)).unbind()
        with sdpa_kernel(backend):
            out = meta.meta_gradient(student, teacher(x), x, y, xq, yq,
                                     list(teacher.parameters()), lr=0.2, mode=mode,
                                     temperature=2.0)
        return out["meta_grads"]

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)       # no fallback to torch.func.jvp
        got = run("jvp", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.CUDNN_ATTENTION])
    for g, w in zip(got, run("autograd", SDPBackend.MATH)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
