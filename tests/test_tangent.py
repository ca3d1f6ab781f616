"""The student's JVP without a second forward: kdops.meta.tangent.TangentTape (a recorded
forward) and kdops.meta.graph_tangent (the autograd graph of an unobserved one), against
torch.func.jvp of a second forward (float64, train-mode networks), and their refusals."""
import contextlib
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
from kdops.meta import gradient
from kdops.meta.graph_tangent import NODES, _nodes, graph_jvp, readable
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
        nn.init.uniform_(self.norm.weight, 0.5, 1.5)   # γ ≠ 1: it multiplies after normalizing
        nn.init.uniform_(self.norm.bias, -0.5, 0.5)
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
    or with an additive mask `bias` (a buffer), a scale other than the default, and a reshape
    of its transposed output."""

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
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, scale=0.5,
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


class Pointwise(nn.Module):
    """The graph reader's other operators: dropout, GELU, SiLU, sigmoid, a product, a weight
    used twice, a batched matmul, permutations, sums, means, views, an expansion, a clone,
    scalar arithmetic."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.mix = nn.Parameter(torch.randn(8, 8) / 3)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 5)

    def forward(self, x):
        h = self.drop(F.gelu(self.embed(x)))
        g = torch.sigmoid(h) * F.silu(h @ self.mix @ self.mix.t())
        a = torch.bmm(g.permute(0, 2, 1), torch.tanh(g)).sum(-1) / 3 - 1
        b = a.unsqueeze(1).expand(4, 3, 8).mean(1) + (-g).clone().transpose(1, 2).mean(2)
        return self.out(b.unsqueeze(1).squeeze(1)) * g.mean() + g.sum()


class Tokens(nn.Module):
    """Embeddings of tokens (drawn from the input), softmax and log-softmax, a split into
    sizes, a concatenation, an unbind."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, x):
        tokens = (x[..., 0].abs() * 4).long().clamp(max=10)
        a, b = self.embed(tokens).split([3, 5], dim=-1)
        first, *rest = torch.cat([F.softmax(a, -1) * 2, F.log_softmax(b, -1)], -1).unbind(1)
        return self.out(first + sum(rest))


class Elementwise(nn.Module):
    """Every elementwise node the graph reader covers (graph_tangent.ELEMENTWISE): activations,
    in place where that has a node of its own, pointwise math on the values where it is
    defined, roundings, functions of two and three tensors, dropout by its fused kernel
    (torch.native_dropout, as CUDA's F.dropout runs), and casts to float32 and back as
    autocast inserts them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, x):
        h = self.embed(x) * 2
        p = F.softplus(h, beta=2.0, threshold=1.0) + 0.5
        acts = [
            F.relu(h), F.threshold(h, 0.1, 2.0), F.threshold(h * 1, 0.1, 2.0, inplace=True),
            F.hardtanh(h * 1, -0.5, 0.5, inplace=True), F.leaky_relu(h, -0.3),
            F.leaky_relu(h * 1, 0.1, inplace=True), F.rrelu(h, training=True), F.elu(h),
            F.selu(h * 1, inplace=True), F.celu(h, 0.7), F.celu(h * 1, 1.3, inplace=True),
            torch.tanh(h), torch.sigmoid(h), F.logsigmoid(h), F.silu(h),
            F.gelu(h, approximate="tanh"), F.mish(h), F.hardswish(h), F.hardsigmoid(h),
            F.hardshrink(h, 0.3), F.softshrink(h, 0.3), torch.native_dropout(h, 0.3, True)[0],
            -h, 1 - h, h.abs(), h.clamp(-0.4, 0.6), h ** 3, p.pow(2.5), h.exp(), h.expm1(),
            p.log(), p.log1p(), p.sqrt(), p.rsqrt(), p.reciprocal(), h.sin(), h.cos(), h.erf(),
            h.float().sigmoid().double()]
        u = torch.tanh(h) * 0.9                                # in (-1, 1)
        functions = [
            h.clamp_min(0.1), h.clamp_max(0.2), 2 ** h, h.exp2(), p.log2(), p.log10(),
            torch.sigmoid(h).logit(), (h * 0.3).tan(), h.sinh(), h.cosh(), u.asin(), u.acos(),
            h.atan(), u.atanh(), h.erfc(), u.erfinv(), h.sign(), h.round(), h.floor(),
            h.ceil(), h.trunc(), h.frac(), torch.maximum(h, h.flip(-1)),
            torch.minimum(h, h.cos()), torch.addcmul(h, h, h.cos(), value=0.5),
            torch.addcdiv(h, h.sin(), p, value=0.3), torch.lerp(h, h.sin(), 0.3),
            torch.lerp(h, h.sin(), u), torch.atan2(h, p), p ** u, torch.hypot(h, p)]
        return self.out(sum(acts).mean(1) + sum(functions).mean(1) / 10)


class Spatial(nn.Module):
    """A depthwise convolution, a group norm, a PReLU, upsamplings (nearest, nearest-exact,
    bilinear, bicubic), pixel and channel shuffles, unfold and fold, adaptive max pooling,
    cumulative sums, triangles and diagonals, and reductions over dims and over all (max,
    min, amax, amin, var, std, norms, logsumexp, prod, with and without keepdim)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.norm = nn.GroupNorm(2, 4)
        nn.init.uniform_(self.norm.weight, 0.5, 1.5)
        self.act = nn.PReLU(4)
        self.out = nn.Linear(4, 5)

    def forward(self, x):
        h = self.act(self.norm(self.depthwise(self.conv(x))))              # [4, 4, 6, 6]
        planes = [
            F.interpolate(h, scale_factor=1.7).mean((2, 3)),         # not 6 / 10
            F.interpolate(h, size=(5, 7), mode="nearest-exact").amax((2, 3)),
            F.interpolate(h, scale_factor=1.5, mode="bilinear").std((2, 3)),
            F.interpolate(h, size=(4, 5), mode="bicubic", align_corners=True).var((2, 3)),
            F.pixel_unshuffle(F.pixel_shuffle(h, 2), 2).logsumexp((2, 3)),
            F.channel_shuffle(h, 2).amin((2, 3), keepdim=True)[..., 0, 0],
            torch.linalg.vector_norm(F.fold(F.unfold(h, 3), (6, 6), 3), 3, dim=(2, 3)),
            F.adaptive_max_pool2d(h, 2).flatten(2).max(-1).values,
            h.flatten(2).min(-1, keepdim=True).values[..., 0],
            h.cumsum(1)[..., 0, 0], h[..., 0].prod(-1), h.tril(1).sum((2, 3)),
            h.triu(-1).sum((2, 3)), h.diagonal(0, 2, 3).sum(-1), h.var(1).mean((1, 2))[:, None]]
        whole = h.max() + h.min() - h[:, 0, 0, :3].prod() + h.var() + h.norm()
        return self.out(sum(planes) + whole)


class Indexing(nn.Module):
    """Selections, slices (a negative start, a step), padding (a negative pad crops), rolls,
    flips, repeats, a gather, advanced indexing, masks (masked_fill; where with a number and
    with two tensors), a stack with an untracked tensor, a number added and one multiplied
    (aten's .Scalar overloads, as decompositions call them), a safe softmax, an einsum."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, x):
        h = self.embed(x) * 2                                  # [4, 7, 8]
        order = torch.arange(7, -1, -1, device=h.device).expand(4, 7, 8)
        pairs = torch.einsum("bij,bkj->bik", h, h).mean(1)     # [4, 7]
        parts = [
            h[:, 0], h[:, -1], h[:, -3::2].mean(1), F.pad(h, (1, -1)).sum(1),
            h.roll(2, 1).flip(2)[:, 1], h.repeat(1, 1, 2)[:, 3, 4:12], h.gather(2, order)[:, 2],
            h[:, torch.tensor([0, 3], device=h.device)].sum(1),
            h.masked_fill(h > 0.5, 0.0)[:, 4], torch.where(h > 0, h, 0.0)[:, 5],
            torch.where(h < 0.2, h, h.exp())[:, 6],
            torch.stack([torch.ones_like(h[:, 1]), h[:, 1]], -1)[..., 1],
            torch.ops.aten.mul.Scalar(h, 0.5)[:, 2], torch.ops.aten.add.Scalar(h, 1.0)[:, 3],
            torch.ops.aten._safe_softmax(h, -1)[:, 4], F.pad(pairs, (0, 1))]
        return self.out(sum(parts))


class Recurrent(nn.Module):
    """LSTM, GRU and RNN layers as the CPU runs them (matrix products, gates, unsafe splits,
    in-place transposes; two bidirectional LSTM layers with dropout between them), an unsafe
    split with sizes and a GLU."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True,
                            dropout=0.2)
        self.gru = nn.GRU(16, 8, batch_first=True)
        self.rnn = nn.RNN(8, 8, batch_first=True)
        self.out = nn.Linear(4, 5)

    def forward(self, x):
        h = self.rnn(self.gru(self.lstm(x)[0])[0])[0]
        first, last = h.unsafe_split_with_sizes([3, 5], -1)
        return self.out(F.glu(torch.cat([last, first], -1), -1).mean(1))


class Cumulative(nn.Module):
    """A cumulative product: an operator the graph reader has no rule for."""

    def forward(self, x):
        return x.cumprod(-1)


def pooled():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AvgPool2d(3, stride=1, padding=1), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 5))


NETS = {
    "residual": (ResidualBlock, (4, 3, 6, 6)),
    "pointwise": (Pointwise, (4, 7, 6)),
    "pooled": (pooled, (4, 3, 6, 6)),
    "tokens": (Tokens, (4, 7, 6)),
    "mixer": (Mixer, (4, 7, 6)),
    "eval_batch_norm": (eval_batch_norm, (4, 3, 6, 6)),
    "clamped": (clamped, (4, 3, 6, 6)),
    "elementwise": (Elementwise, (4, 7, 6)),
    "indexing": (Indexing, (4, 7, 6)),
    "spatial": (Spatial, (4, 3, 6, 6)),
    "recurrent": (Recurrent, (4, 7, 6)),
    "attention": (Attention, (4, 7, 6)),
    "attention_dropout": (lambda: Attention(dropout=0.3), (4, 7, 6)),
    "cumulative": (lambda: nn.Sequential(nn.Linear(6, 8), Cumulative(), nn.Linear(8, 5)),
                   (4, 7, 6)),
}


def _device(name):
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(name)


# The nets whose every autograd node the graph reader covers. In float64 attention runs the
# CPU's fused kernel, and with dropout the math path of F.scaled_dot_product_attention (the
# CPU's fused kernel takes no dropout, a GPU's none takes float64).
GRAPH_READABLE = set(NETS) - {"cumulative"}


def _tape_jvp(net, x, sources, tangents):
    tape = TangentTape(sources)
    with tape:
        out = net(x)
    return tape.jvp(out, tangents)


def _graph_jvp(net, x, sources, tangents):
    out = net(x)
    assert readable(out)
    return graph_jvp(out, sources, tangents)


def _recorded_and_reference(net, x, sources, tangents, jvp_of=_tape_jvp):
    """(`jvp_of`'s JVP of the forward, by default the tape's of a recorded one, and
    torch.func.jvp of a second forward with the same random draws and batch statistics)."""
    state = torch.random.get_rng_state(), (torch.cuda.get_rng_state()
                                           if x.is_cuda else None)
    got = jvp_of(net, x, sources, tangents)
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


def _net_and_sources(name, sources, device):
    build, shape = NETS[name]
    torch.manual_seed(0)
    net = build().double().to(device)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    params = list(net.parameters())
    if sources != "all":          # weights alone, or biases, γ and β alone (as BitFit trains)
        for p in params:
            p.requires_grad_((p.dim() > 1) == (sources == "weights"))
        params = [p for p in params if p.requires_grad]
    return net, x, params, [torch.randn_like(p) for p in params]


# The tape refuses the elementwise net's in-place operators that it has no rule for and its
# random ones other than dropout (see test_tape_refuses_what_it_cannot_replay), and the in-place
# products of the CPU's LSTM cells.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(set(NETS) - {"elementwise", "recurrent"}))
@pytest.mark.parametrize("sources", ["all", "weights", "vectors"])
def test_tape_jvp_matches_a_second_forward(name, sources, device):
    got, want = _recorded_and_reference(*_net_and_sources(name, sources, _device(device)))
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


# On a GPU the recurrent net runs cuDNN's RNN, whose dropout between LSTM layers is refused
# (test_recurrent_tangent.py tests cuDNN's RNNs).
@pytest.mark.parametrize("name,device", [(name, device) for name in sorted(GRAPH_READABLE)
                                         for device in DEVICES
                                         if (name, device) != ("recurrent", "cuda")])
@pytest.mark.parametrize("sources", ["all", "weights", "vectors"])
def test_graph_jvp_matches_a_second_forward(name, sources, device):
    net, x, params, tangents = _net_and_sources(name, sources, _device(device))
    got, want = _recorded_and_reference(net, x, params, tangents, jvp_of=_graph_jvp)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_the_readable_nets_have_every_node_the_reader_covers():
    """So that the test above checks every rule of graph_tangent.NODES (cuDNN's batch norm,
    the fused attention kernels of a GPU and bags of embeddings have tests of their own below;
    oneDNN's and cuDNN's recurrent layers, which torch.func.jvp does not differentiate, in
    test_recurrent_tangent.py)."""
    seen = {"CudnnBatchNormBackward0", "EmbeddingBagBackward0", "MkldnnRnnLayerBackward0",
            "CudnnRnnBackward0",
            "ScaledDotProductFlashAttentionBackward0",
            "ScaledDotProductEfficientAttentionBackward0",
            "ScaledDotProductCudnnAttentionBackward0"}
    for name in GRAPH_READABLE:
        net, x, _, _ = _net_and_sources(name, "all", torch.device("cpu"))
        seen |= {type(n).__name__ for n in _nodes(net(x))[0]}
    assert set(NODES) <= seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["residual", "pointwise", "pooled", "tokens", "mixer",
                                  "clamped", "spatial", "attention"])
def test_graph_jvp_under_autocast_agrees_with_the_tape(name, device):
    """Under autocast the graph holds its casts (ToCopyBackward0) and 16-bit saved values, and
    a layer norm normalizes a bfloat16 input in float32. torch.func.jvp does not run under
    autocast; the tape's JVP, which replays each operator with its own rule or forward-mode
    autograd, is the reference. They agree to bfloat16's epsilon in norm, not elementwise: an
    output near zero can be the difference of larger, rounded terms (where both run the same
    rules they are bitwise equal)."""
    device = _device(device)
    build, shape = NETS[name]
    torch.manual_seed(0)
    net = build().to(device)
    x = torch.randn(shape, device=device)
    params = list(net.parameters())
    tangents = [torch.randn_like(p) for p in params]

    def under_autocast(jvp_of):
        torch.manual_seed(1)                   # the same dropout masks
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return jvp_of(net, x, params, tangents)

    got, want = under_autocast(_graph_jvp), under_autocast(_tape_jvp)
    assert got.dtype == torch.bfloat16 and want.abs().max() > 0.1
    eps = torch.finfo(torch.bfloat16).eps
    assert (got.float() - want.float()).norm() <= eps * want.float().norm()


@pytest.mark.parametrize("training", [True, False])
def test_graph_jvp_through_cudnn_batch_norm(training, monkeypatch):
    """cuDNN's batch norm serves float32 on a GPU (float64 takes the native kernel)."""
    device = _device("cuda")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # both JVPs exact float32
    torch.manual_seed(0)
    net = pooled().to(device).train(training)
    x = torch.randn(4, 3, 6, 6, device=device)
    assert "CudnnBatchNormBackward0" in {type(n).__name__ for n in _nodes(net(x))[0]}
    params = list(net.parameters())
    tangents = [torch.randn_like(p) for p in params]
    got, want = _recorded_and_reference(net, x, params, tangents, jvp_of=_graph_jvp)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


REFUSED_GRAPHS = [(name, "cpu") for name in sorted(set(NETS) - GRAPH_READABLE)]


@pytest.mark.parametrize("name,device", REFUSED_GRAPHS)
def test_graph_jvp_refuses_nodes_it_has_no_rule_for(name, device):
    net, x, params, tangents = _net_and_sources(name, "all", _device(device))
    out = net(x)
    assert not readable(out)
    with pytest.raises(UnsupportedForward, match="no tangent rule for the autograd node"):
        graph_jvp(out, params, tangents)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_graph_jvp_through_bags_of_embeddings(mode, include_last_offset):
    """embedding_bag has no forward-mode rule and no double backward: the reference is its
    Jacobian from autograd's backward, one row per output. Bags: three entries, an empty one,
    one of padding alone, four; per-sample weights with the sums."""
    torch.manual_seed(0)
    weight = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, 10, (12,))
    indices[3:8] = 2
    offsets = torch.tensor([0, 3, 3, 8] + [12] * include_last_offset)
    weights = torch.rand(12, dtype=torch.float64) if mode == "sum" else None

    def bags(w):
        return F.embedding_bag(indices, w, offsets, mode=mode, padding_idx=2,
                               include_last_offset=include_last_offset,
                               per_sample_weights=weights)

    out, tangent = bags(weight), torch.randn_like(weight)
    jacobian = torch.autograd.functional.jacobian(bags, weight).reshape(out.numel(), -1)
    want = (jacobian @ tangent.flatten()).view(out.shape)
    assert want.abs().max() > 0.1 and (want[1:3] == 0).all()      # empty and padding bags
    torch.testing.assert_close(graph_jvp(out, [weight], [tangent]), want, rtol=1e-12, atol=0)


def test_graph_jvp_refuses_a_tangent_of_the_per_sample_weights():
    """Its tangent would need the table, which embedding_bag's node does not keep."""
    table = torch.randn(10, 4, dtype=torch.float64)
    weights = torch.rand(5, dtype=torch.float64, requires_grad=True)
    out = F.embedding_bag(torch.arange(5), table, torch.tensor([0, 2]), mode="sum",
                          per_sample_weights=weights)
    with pytest.raises(UnsupportedForward, match="per-sample weights"):
        graph_jvp(out, [weights], [torch.ones_like(weights)])


def test_graph_jvp_refuses_an_elementwise_input_broadcast_to_the_output():
    """An elementwise node sums a broadcast input's gradient back to the input's shape, which
    its tangent cannot undo: refused, not wrong. The input of the output's shape is read."""
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    floor = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = torch.maximum(h, floor)
    dh = torch.randn_like(h)
    torch.testing.assert_close(graph_jvp(out, [h], [dh]), torch.where(h > floor, dh, 0.0))
    with pytest.raises(UnsupportedForward, match="broadcast"):
        graph_jvp(out, [floor], [torch.ones_like(floor)])


def test_graph_jvp_refuses_a_graph_changed_or_freed_since_the_forward():
    net, x, params, tangents = _net_and_sources("pooled", "all", torch.device("cpu"))
    out = net(x)
    with torch.no_grad():
        net[0].weight.mul_(2)                  # the convolution saved it for its backward
    with pytest.raises(UnsupportedForward, match="modified by an inplace operation"):
        graph_jvp(out, params, tangents)
    out = net(x)
    out.sum().backward()                       # frees the saved tensors
    with pytest.raises(UnsupportedForward, match="ConvolutionBackward0"):
        graph_jvp(out, params, tangents)


def test_graph_jvp_holds_other_leaves_constant_and_checks_its_tangents():
    torch.manual_seed(0)
    w, v = torch.randn(3, 3, dtype=torch.float64, requires_grad=True), torch.randn(
        3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64)
    out = torch.tanh(x @ w + v) @ w            # w read twice, v not a source
    dw = torch.randn_like(w)
    want = jvp(lambda w_: torch.tanh(x @ w_ + v.detach()) @ w_, (w.detach(),), (dw,))[1]
    torch.testing.assert_close(graph_jvp(out, [w], [dw]), want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(graph_jvp(x * 2, [w], [dw]), torch.zeros(2, 3,
                                                                       dtype=torch.float64))
    with pytest.raises(ValueError, match="1 tangents for 2 sources"):
        graph_jvp(out, [w, v], [dw])
    out = torch.cat([x, w * 2, x + 1])         # two untracked tensors: sizes not in the graph
    with pytest.raises(UnsupportedForward, match="several tensors that autograd does not"):
        graph_jvp(out, [w], [dw])


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


# (device, dtype, with an additive mask, the one kernel allowed or None): where the dispatcher
# picks a fused kernel (CPU flash; on an H100 memory-efficient for float32, cuDNN for
# bfloat16), and CUDA's flash kernel (16-bit, no mask) by itself.
FUSED_ATTENTION = [(device, dtype, with_bias, None) for device in DEVICES
                   for dtype in (torch.float32, torch.bfloat16) for with_bias in (False, True)]
FUSED_ATTENTION.append(("cuda", torch.bfloat16, False, SDPBackend.FLASH_ATTENTION))


@pytest.mark.parametrize("device,dtype,with_bias,kernel", FUSED_ATTENTION)
@pytest.mark.parametrize("jvp_of", [_tape_jvp, _graph_jvp], ids=["tape", "graph"])
def test_jvp_through_a_fused_attention_kernel(device, dtype, with_bias, kernel, jvp_of):
    device = _device(device)
    torch.manual_seed(2)
    net = Attention(bias=torch.randn(7, 7) if with_bias else None).to(device, dtype)
    x = torch.randn(4, 7, 6, device=device, dtype=dtype)
    params = list(net.parameters())
    tangents = [torch.randn_like(p) for p in params]
    with sdpa_kernel(kernel) if kernel else contextlib.nullcontext():
        got = jvp_of(net, x, params, tangents)
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


@pytest.mark.parametrize("jvp_of", [_tape_jvp, _graph_jvp], ids=["tape", "graph"])
def test_jvp_refuses_the_dropout_of_a_fused_attention_kernel(jvp_of):
    """In float64 (above) attention dropout runs in the math path, whose masks the tape
    records and the graph keeps; a fused CUDA kernel draws its own."""
    device = _device("cuda")
    net = Attention(dropout=0.5).to(device)
    params = list(net.parameters())
    with pytest.raises(UnsupportedForward, match="attention dropout"):
        jvp_of(net, torch.randn(2, 7, 6, device=device), params,
               [torch.ones_like(p) for p in params])


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


def test_jvp_mode_reads_the_first_graph_where_its_record_fails():
    """The tape refuses the in-place product; the autograd graph has it: the first pilot's
    graph is read as the later ones are, with no second forward and no warning."""
    torch.manual_seed(0)
    student, teacher = InPlaceScale().double(), nn.Linear(3, 4).double()
    calls = _counting(student)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        first = _meta_grads(student, teacher, "jvp")
        assert len(calls) == 2                    # the pilot's and the quiz's forwards
        again = _meta_grads(student, teacher, "jvp")
    for got, later, w in zip(first, again, _meta_grads(student, teacher, "autograd")):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(later, w, rtol=1e-10, atol=1e-13)


def test_jvp_mode_falls_back_to_a_second_forward_with_a_warning():
    """Neither the tape (an in-place product) nor the graph (a cumulative product) serves:
    torch.func.jvp runs a second forward, with a warning."""
    torch.manual_seed(0)
    student = nn.Sequential(InPlaceScale(), Cumulative()).double()
    teacher = nn.Linear(3, 4).double()
    calls = _counting(student)
    with pytest.warns(UserWarning, match="no tangent rule for aten.mul_"):
        got = _meta_grads(student, teacher, "jvp")
    assert len(calls) == 3
    for g, w in zip(got, _meta_grads(student, teacher, "autograd")):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


class WeightedBag(nn.Module):
    """Learnt per-sample weights of an embedding bag: neither the graph (its node does not keep
    the table), the tape nor torch.func.jvp (embedding_bag has no forward-mode rule) serves.
    `decomposed`: the same bags as a selection, a product and sums, which autograd
    differentiates twice (embedding_bag's backward has no derivative)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4))
        self.weights = nn.Parameter(torch.rand(6))
        self.out = nn.Linear(3, 4)
        self.decomposed = False

    def forward(self, x):
        indices = torch.tensor([1, 4, 4, 7, 0, 9])
        if self.decomposed:
            rows = self.table[indices] * self.weights[:, None]
            bags = torch.stack([rows[:2].sum(0), rows[2:].sum(0)])
        else:
            bags = F.embedding_bag(indices, self.table, torch.tensor([0, 2]), mode="sum",
                                   per_sample_weights=self.weights)
        return self.out(x) + bags.sum(0)


def test_jvp_mode_says_which_mode_serves_where_no_jvp_does():
    torch.manual_seed(0)
    student, teacher = WeightedBag().double(), nn.Linear(3, 4).double()
    with pytest.warns(UserWarning, match="second forward"), pytest.raises(
            NotImplementedError, match="(?s)_embedding_bag.*mode='finite_difference'"):
        _meta_grads(student, teacher, "jvp")
    got = _meta_grads(student, teacher, "finite_difference")
    student.decomposed = True
    for g, w in zip(got, _meta_grads(student, teacher, "autograd")):
        assert w.abs().max() > 1e-3
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("readable_graph", [True, False])
def test_jvp_mode_reads_the_graph_once_a_record_showed_it_readable(readable_graph, monkeypatch):
    """The first "jvp" pilot forward is recorded; where its autograd graph is readable, the
    later ones run unobserved and graph_jvp reads them. The same meta-gradients every time."""
    records = []

    class CountingTape(TangentTape):
        def __enter__(self):
            records.append(1)
            return super().__enter__()

    monkeypatch.setattr(gradient, "TangentTape", CountingTape)
    torch.manual_seed(0)
    middle = nn.Dropout(0.2) if readable_graph else Cumulative()
    student = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), middle, nn.Linear(8, 4)).double()
    teacher = nn.Linear(3, 4).double()
    want = _meta_grads(student, teacher, "autograd")
    for _ in range(3):
        for got, w in zip(_meta_grads(student, teacher, "jvp"), want):
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-13)
    assert len(records) == (1 if readable_graph else 3)
    assert gradient._GRAPH_READABLE[student] is readable_graph


def test_jvp_mode_falls_back_when_a_graph_it_expected_readable_is_not():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 8), Cumulative(), nn.Linear(8, 4)).double()
    teacher = nn.Linear(3, 4).double()
    gradient._GRAPH_READABLE[student] = True           # as if an earlier graph had been
    with pytest.warns(UserWarning, match="no tangent rule for the autograd node "
                                         "CumprodBackward0"):
        got = _meta_grads(student, teacher, "jvp")
    assert not gradient._GRAPH_READABLE[student]       # the next pilot is recorded again
    for g, w in zip(got, _meta_grads(student, teacher, "autograd")):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_attention_student_meta_gradient_through_the_fused_kernel():
    """The fused CPU/CUDA attention kernels have no double backward (mode="autograd" fails
    with them) and no forward-mode rule (torch.func.jvp fails): the tape (the first pilot's
    record), then the graph reader (the second pilot's graph) give the exact meta-gradient,
    equal to "autograd" through the math kernel."""
    def run(mode, backend, steps=1):
        torch.manual_seed(0)
        student, teacher = Attention().double(), Attention().double()
        x, xq = torch.randn(2, 4, 7, 6, dtype=torch.float64).unbind()
        y, yq = torch.randint(0, 5, (2, 4)).unbind()
        with sdpa_kernel(backend):
            return student, [meta.meta_gradient(student, teacher(x), x, y, xq, yq,
                                                list(teacher.parameters()), lr=0.2, mode=mode,
                                                temperature=2.0)["meta_grads"]
                             for _ in range(steps)]

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)       # no fallback to torch.func.jvp
        student, (recorded, read) = run("jvp", [SDPBackend.FLASH_ATTENTION,
                                                SDPBackend.EFFICIENT_ATTENTION,
                                                SDPBackend.CUDNN_ATTENTION], steps=2)
    assert gradient._GRAPH_READABLE[student]
    (want,) = run("autograd", SDPBackend.MATH)[1]
    for g, again, w in zip(recorded, read, want):
        torch.testing.assert_close(again, w, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
