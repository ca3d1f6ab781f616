"""The student's JVP through the fused recurrent layers, which have no forward-mode rule
(kdops.meta.recurrent): oneDNN's LSTM layer (a float32 LSTM on the CPU) and cuDNN's RNNs (on a
GPU). References: torch.func.jvp with the fused kernels off, where the recurrence decomposes
into operators it differentiates, on the CPU."""
import contextlib
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.utils.rnn import pack_padded_sequence

from kdops import meta
from kdops.meta import recurrent
from kdops.meta.graph_tangent import _nodes, graph_jvp, readable
from kdops.meta.tangent import UnsupportedForward

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@contextlib.contextmanager
def _off(backend):
    """torch.backends.mkldnn or .cudnn off, nothing else changed (their `flags` also reset
    other settings)."""
    enabled = backend.enabled
    backend.enabled = False
    try:
        yield
    finally:
        backend.enabled = enabled


def _node_names(out):
    return {type(n).__name__ for n in _nodes(out)[0]}


def _func_jvp(net, params, tangents, *inputs):
    """torch.func.jvp of net(*inputs) along `tangents` of `params` (of net's parameters)."""
    names = {p: n for n, p in net.named_parameters()}
    return jvp(lambda *ps: functional_call(net, {names[p]: q for p, q in zip(params, ps)},
                                           inputs),
               tuple(p.detach() for p in params), tuple(tangents))[1]


class OneDnnLstm(nn.Module):
    """Two bidirectional LSTM layers, batch first, their initial hidden state computed from the
    input (a tracked state) and their initial cell state zero."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.init = nn.Linear(6, 8)

    def forward(self, x):
        h0 = torch.tanh(self.init(x.mean(1))).expand(4, -1, -1).contiguous()
        return self.lstm(x, (h0, torch.zeros_like(h0)))[0]


def test_graph_jvp_through_onednn_lstm_layers():
    """A float32 LSTM on the CPU runs oneDNN's fused layer."""
    torch.manual_seed(0)
    net, x = OneDnnLstm(), torch.randn(4, 7, 6)
    out = net(x)
    if "MkldnnRnnLayerBackward0" not in _node_names(out):
        pytest.skip("this build of torch runs float32 LSTMs on the CPU without oneDNN")
    params = list(net.parameters())
    tangents = [torch.randn_like(p) for p in params]
    with _off(torch.backends.mkldnn):
        want = _func_jvp(net, params, tangents, x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(graph_jvp(out, params, tangents), want, rtol=1e-5, atol=1e-6)


RNNS = {
    "lstm": (2, lambda **kw: nn.LSTM(5, 6, **kw)),
    "lstm_projected": (2, lambda **kw: nn.LSTM(5, 6, proj_size=3, **kw)),
    "gru": (3, lambda **kw: nn.GRU(5, 6, **kw)),
    "rnn_tanh": (1, lambda **kw: nn.RNN(5, 6, **kw)),
    "rnn_relu": (0, lambda **kw: nn.RNN(5, 6, nonlinearity="relu", **kw)),
}


@pytest.mark.parametrize("name", list(RNNS))
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_cudnn_rule_agrees_with_the_decomposed_layers(name, bidirectional, batch_first, bias):
    """The rule of cuDNN's node on the arguments it reads, against torch.func.jvp of the same
    layers decomposed on the CPU (float64): two layers, a tracked initial state, the tangents
    of the output and of the last state."""
    mode, build = RNNS[name]
    torch.manual_seed(0)
    rnn = build(num_layers=2, bidirectional=bidirectional, batch_first=batch_first,
                bias=bias).double()
    directions = 2 if bidirectional else 1
    x = torch.randn((3, 4, 5) if batch_first else (4, 3, 5), dtype=torch.float64)
    hidden = rnn.proj_size or rnn.hidden_size
    hx = torch.randn(2 * directions, 3, hidden, dtype=torch.float64)
    cx = torch.randn(2 * directions, 3, 6, dtype=torch.float64) if "lstm" in name else None
    weights = tuple(rnn._flat_weights)
    states = (hx,) if cx is None else (hx, cx)
    dx, dws = torch.randn_like(x), [torch.randn_like(w) for w in weights]
    dstates = [torch.randn_like(h) for h in states]
    args = (x, weights, hx, cx, recurrent._CUDNN_MODES[mode], 2, bidirectional, batch_first)
    got = recurrent.cudnn_rnn(args, [dx, *dws, *dstates, None][:len(weights) + 3], None, None,
                              {})

    def layers(x, *rest):
        state, ws = rest[:len(states)], rest[len(states):]
        out, last = functional_call(rnn, dict(zip(rnn._flat_weights_names, ws)),
                                    (x, state if cx is not None else state[0]))
        return (out, last) if cx is None else (out, *last)

    want = jvp(layers, (x, *states, *weights), (dx, *dstates, *dws))[1]
    assert len(got) == 3 and (got[2] is None) == (cx is None)
    for g, w in zip(got, want):
        assert w.abs().max() > 0.1
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


class CudnnRnns(nn.Module):
    """An LSTM with a projection (two bidirectional layers, batch first, dropout between them
    in training), a GRU from a tracked initial state and a ReLU RNN, as cuDNN runs them."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True,
                            proj_size=5, dropout=0.3)
        self.init = nn.Linear(6, 7)
        self.gru = nn.GRU(10, 7)
        self.rnn = nn.RNN(7, 4, nonlinearity="relu", bias=False)

    def forward(self, x):
        h = self.lstm(x)[0].transpose(0, 1)
        h0 = torch.tanh(self.init(x.mean(1)))[None]
        return self.rnn(self.gru(h, h0)[0])[0].mean(0)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_graph_jvp_through_cudnn_rnns(dtype, monkeypatch):
    """Out of training (so no dropout), read off the graph on the GPU; the reference is the
    same network's torch.func.jvp on the CPU in float64."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    net, x = CudnnRnns().double().eval(), torch.randn(3, 9, 6, dtype=torch.float64)
    params = list(net.parameters())
    tangents = [torch.randn_like(p) for p in params]
    want = _func_jvp(net, params, tangents, x)
    net.to("cuda", dtype)
    params = list(net.parameters())
    out = net(x.to("cuda", dtype))
    assert "CudnnRnnBackward0" in _node_names(out) and readable(out)
    got = graph_jvp(out, params, [t.to("cuda", dtype) for t in tangents])
    assert want.abs().max() > 0.1
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)
    torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=atol)


@CUDA
def test_graph_jvp_refuses_cudnn_dropout_and_packed_sequences():
    """cuDNN draws the masks of its dropout between layers inside the kernel; a packed
    sequence is not read either."""
    torch.manual_seed(0)
    net, x = CudnnRnns().cuda().train(), torch.randn(3, 9, 6, device="cuda")
    params = list(net.parameters())
    tangents = [torch.randn_like(p) for p in params]
    with pytest.raises(UnsupportedForward, match="drops out between its layers"):
        graph_jvp(net(x), params, tangents)
    gru = nn.GRU(6, 4, batch_first=True).cuda()
    packed = pack_padded_sequence(x, torch.tensor([9, 5, 2]), batch_first=True)
    out = gru(packed)[0].data
    with pytest.raises(UnsupportedForward, match="packed sequence"):
        graph_jvp(out, list(gru.parameters()), [torch.ones_like(p) for p in gru.parameters()])


class LstmStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.lstm(x[:, None].expand(-1, 5, -1).contiguous())[0].mean(1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_jvp_mode_through_a_float32_lstm_student(device, monkeypatch):
    """oneDNN's LSTM layer (CPU) and cuDNN's (GPU) have neither a forward-mode rule (torch.func
    .jvp fails on them) nor a double backward ("autograd" fails): the graph gives the
    meta-gradient, from the first step, equal to "autograd" with the fused kernels off to
    float32 rounding."""
    if device == "cuda":                 # TF32 off (a CPU build's cuBLAS flags do not undo)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    student, teacher = LstmStudent().to(device), nn.Linear(3, 4).to(device)
    x, xq = torch.randn(2, 6, 3, device=device).unbind()
    y, yq = torch.randint(0, 4, (2, 6), device=device).unbind()

    def meta_grads(mode):
        return meta.meta_gradient(student, teacher(x), x, y, xq, yq, list(teacher.parameters()),
                                  lr=0.2, mode=mode, temperature=2.0)["meta_grads"]

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="kdops.meta")   # no second forward
        got = meta_grads("jvp")
    with _off(torch.backends.mkldnn), _off(torch.backends.cudnn):
        want = meta_grads("autograd")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
