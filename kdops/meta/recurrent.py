"""Tangents of the fused recurrent layers (oneDNN's LSTM layer, cuDNN's RNNs), for graph_tangent.

Neither fused kernel has a forward-mode rule. Their nodes keep the input, the weights and the
initial state, which is all the recurrence needs: the tangents come from forward-mode autograd
through the same recurrence written with plain operators (`_direction`), which runs the primal
again. As PyTorch defines the cells (x the step's input, h and c the state, σ the sigmoid):

  LSTM   i, f, g, o = chunks of W_ih·x + b_ih + W_hh·h + b_hh
         c' = σ(f)·c + σ(i)·tanh(g),  h' = σ(o)·tanh(c')  (then W_hr·h' with a projection)
  GRU    r, z = σ(chunks of W_ih·x + b_ih + W_hh·h + b_hh),
         n = tanh((W_ih·x + b_ih)_n + r·(W_hh·h + b_hh)_n),  h' = (1 − z)·n + z·h
  RNN    h' = tanh or relu of W_ih·x + b_ih + W_hh·h + b_hh
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .tangent import UnsupportedForward, _forward_ad

# cuDNN's numbering of _cudnn_rnn's mode argument
_CUDNN_MODES = {0: "rnn_relu", 1: "rnn_tanh", 2: "lstm", 3: "gru"}


def _cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr):
    """One time step: the next (h, c); c is None but for LSTMs."""
    gi, gh = F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh)
    if mode == "lstm":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr)), c
    if mode == "gru":
        (ir, iz, i_n), (hr, hz, h_n) = gi.chunk(3, -1), gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n), None
    return (torch.relu if mode == "rnn_relu" else torch.tanh)(gi + gh), None


def _direction(mode, seq, h, c, weights, reverse):
    """One direction of one layer over a time-major sequence [T, B, F]: (outputs [T, B, H], the
    last h, the last c). `weights`: W_ih, W_hh, then b_ih, b_hh where there are biases, then
    W_hr where there is a projection (PyTorch's order)."""
    w_ih, w_hh, *rest = weights
    w_hr = rest.pop() if len(rest) % 2 else None
    b_ih, b_hh = rest if rest else (None, None)
    ys = [None] * len(seq)
    for t in (reversed(range(len(seq))) if reverse else range(len(seq))):
        h, c = _cell(mode, seq[t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr)
        ys[t] = h
    return torch.stack(ys), h, c


def onednn_lstm_layer(args, targs, outs, meta, kwargs):
    """oneDNN's LSTM layer (mkldnn_rnn_layer: one direction of one layer, time-major;
    args = input, W_ih, W_hh, b_ih, b_hh, h0, c0, reverse): tangents of (output, h, c)."""
    reverse = args[7]

    def layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0):
        weights = [w for w in (w_ih, w_hh, b_ih, b_hh) if w is not None]
        return _direction("lstm", x, h0, c0, weights, reverse)

    return _forward_ad(layer, args[:7], targs[:7], {})


def read_cudnn_rnn(n):
    """CudnnRnnBackward0's saved values: (input, weights, hx, cx, mode, layers, bidirectional,
    batch_first). Refused: dropout between layers (cuDNN draws its masks inside the kernel and
    keeps them to itself) and packed sequences."""
    if n._saved_train and n._saved_dropout > 0 and n._saved_num_layers > 1:
        raise UnsupportedForward("cuDNN's RNN drops out between its layers with masks that "
                                 "neither its graph nor a record keeps")
    if len(n._saved_batch_sizes):
        raise UnsupportedForward("cuDNN's RNN over a packed sequence")
    args = (n._saved_input, tuple(n._saved_weight), n._saved_hx, n._saved_cx,
            _CUDNN_MODES[n._saved_mode], n._saved_num_layers, n._saved_bidirectional,
            n._saved_batch_first)
    return args, (None,), {}


def cudnn_rnn(args, targs, outs, meta, kwargs):
    """cuDNN's RNN (_cudnn_rnn: every layer and direction of an LSTM, GRU or RNN in one node;
    its inputs are the input, each weight, hx, cx): tangents of (output, hy, cy)."""
    x, weights, hx, cx, mode, layers, bidirectional, batch_first = args
    k = len(weights)
    tangents = (targs[0], tuple(targs[1:1 + k]), targs[1 + k], targs[2 + k])
    directions = 2 if bidirectional else 1
    per = k // (layers * directions)

    def rnn(x, weights, hx, cx):
        seq = x.transpose(0, 1) if batch_first else x
        hs, cs = [], []
        for layer in range(layers):
            ys = []
            for d in range(directions):
                j = layer * directions + d
                y, h, c = _direction(mode, seq, hx[j], None if cx is None else cx[j],
                                     weights[j * per:(j + 1) * per], reverse=d == 1)
                ys.append(y)
                hs.append(h)
                cs.append(c)
            seq = torch.cat(ys, -1)
        return (seq.transpose(0, 1) if batch_first else seq, torch.stack(hs),
                None if cx is None else torch.stack(cs))

    return _forward_ad(rnn, (x, weights, hx, cx), tangents, {})
