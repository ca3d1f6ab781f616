"""The student's JVP read off the autograd graph of a forward that nobody watched.

A forward with autograd leaves a graph whose nodes keep what their backward needs; for the
operators below that is what their tangent needs too (a convolution's input and weight, a batch
norm's input and batch statistics, a ReLU's output). `graph_jvp(output, sources, tangents)`
walks the graph from the sources' AccumulateGrad nodes to `output` and runs, node by node, a
tangent rule on those saved values: the tape's (`tangent_rules`) where it has one for the
operator, else one of those below. The forward itself costs nothing extra:
where `TangentTape` observes every operator of the forward through a dispatch mode (tens of
microseconds each, which bind a GPU's host), this reads about a hundred nodes once.

It covers the operators of convolutional, multilayer-perceptron and sequence students:
convolutions and matrix products, batch, layer and group norms, pooling and upsampling,
attention (its fused kernels without dropout, and its math path), recurrent layers (as the CPU
decomposes them, and the fused ones of oneDNN and cuDNN: `recurrent`), softmax, embeddings and
bags of them, splits, concatenations and stacks, indexing, slicing, padding and shuffles, masks,
reductions, dtype casts (autocast's), dropout, activations and elementwise math (`NODES`). A
graph with any other node, or whose saved tensors were changed in place or freed (autograd's own
checks), raises `UnsupportedForward`; `readable(output)` says beforehand whether every node is
covered (some refusals come only on reading: an elementwise node's input broadcast to its
output's shape, a tangent of embedding_bag's per-sample weights, cuDNN's RNN with dropout
between its layers or over a packed sequence). Tensors that require grad but are not sources are
held constant (zero tangent).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from .recurrent import cudnn_rnn, onednn_lstm_layer, read_cudnn_rnn
from .tangent import UnsupportedForward, _shaped
from .tangent_rules import RULES, _apply_to_tangent, _identity, _sum, aten


class _Node(NamedTuple):
    rule: Callable    # tangent_rules' (args, tangents, outs, meta, kwargs) -> output tangent(s)
    edges: tuple      # per input of the node (next_functions), its argument position; None:
                      # the tangents of the inputs are the rule's tangents, in order
    read: Callable    # node -> (args, outs, kwargs) in the operator's layout, from saved values


def _of(func, edges, read):
    return _Node(RULES[func].tangent, edges, read)


def _linear(func, read):
    """The node of an operator linear in its one tracked tensor: the operator applied to dx."""
    return _Node(_apply_to_tangent(func).tangent, (0,), read)


def _nothing_saved(arity):
    return lambda n: ((None,) * arity, (None,), {})


def _dims(saved):
    """Saved dims (or indices, pads, shifts) as a list of ints: a negative one can come back as
    its unsigned 64-bit pattern (mean over [-1, -2] reads [2**64 - 1, 2**64 - 2])."""
    return [d - (1 << 64) if d >= 1 << 63 else d for d in saved]


def _upsampling(func, align_corners):
    """The node of upsample_*2d(x, output_size, [align_corners,] scales_h, scales_w)."""
    def read(n):
        corners = (n._saved_align_corners,) if align_corners else ()
        return ((None, list(n._saved_output_size), *corners, n._saved_scales_h,
                 n._saved_scales_w), (None,), {})
    return _linear(func, read)


def _window(n):
    """im2col / col2im: kernel size, dilation, padding, stride."""
    return [list(s) for s in (n._saved_kernel_size, n._saved_dilation, n._saved_padding,
                              n._saved_stride)]


def _biased_attention(func):
    """The node of CUDA's memory-efficient or cuDNN attention: (q, k, v, bias,
    compute_log_sumexp, dropout_p, is_causal, scale=). Three edges where the bias is not
    differentiable, four where it is: edges zip to the first."""
    return _of(func, (0, 1, 2, 3), lambda n: (
        (n._saved_query, n._saved_key, n._saved_value, n._saved_attn_bias, True,
         n._saved_dropout_p, n._saved_is_causal), (None,), {"scale": n._saved_scale}))


def _convolution(n):
    """convolution: (input, weight, bias, stride, padding, dilation, transposed,
    output_padding, groups); the bias's value is not needed."""
    sizes = [list(x) for x in (n._saved_stride, n._saved_padding, n._saved_dilation)]
    args = (n._saved_input, n._saved_weight, None, *sizes, n._saved_transposed,
            list(n._saved_output_padding), n._saved_groups)
    return args, (None,), {}


def _batch_norm(n):
    """native_batch_norm / cudnn_batch_norm: (input, weight, bias, running_mean, running_var,
    training, momentum, eps) -> (out, mean, invstd). Running statistics are read only out of
    training, where they are the ones used (in training the forward has moved them)."""
    training = n._saved_training
    eps = n._saved_eps if hasattr(n, "_saved_eps") else n._saved_epsilon
    stats = (None, None) if training else (n._saved_running_mean, n._saved_running_var)
    args = (n._saved_input, n._saved_weight, None, *stats, training, 0.0, eps)
    return args, (None, n._saved_result1, n._saved_result2), {}


def _divide(args, targs, outs, meta, kwargs):
    """a / b: da / b − a·db / b² (a is saved where b requires grad, b always)."""
    a, b = args
    da, db = targs
    return _sum([da / b if da is not None else None,
                 -(a * db) / (b * b) if db is not None else None])


def _elementwise(args, targs, outs, meta, kwargs):
    """z = f(x, y, …) elementwise: each input's Jacobian is diagonal, so symmetric, and its term
    of the tangent is the backward applied to its tangent, that is the node itself (args[0])
    called on dx, at dx's input. The node reads what it keeps to itself, such as whether CUDA's
    fused dropout applied. An input broadcast to the output's shape would come back summed to
    its own: refused."""
    node, shape = args[0], meta[0][0]
    terms = []
    for i, t in enumerate(targs):
        if t is None:
            continue
        if t.shape != shape:
            raise UnsupportedForward(f"{node.name()}: an input broadcast to the output's shape")
        grads = node(t)
        terms.append(grads[i] if isinstance(grads, tuple) else grads)
    return _sum(terms)


def _prelu(args, targs, outs, meta, kwargs):
    """prelu(x, w) = x where x > 0, else w·x (w viewed to broadcast): dx there, else
    w·dx + x·dw."""
    x, w = args
    dx, dw = targs
    below = _sum([None if dx is None else w * dx, None if dw is None else x * dw])
    return torch.where(x > 0, 0.0 if dx is None else dx, below)


def _reduction(args, targs, outs, meta, kwargs):
    """z = r(x) over dims (all of them where dims is None), each element of x feeding one
    element of z: the node called on ones gives, at each element of x, the derivative of the
    element of z it feeds, and dz is that times dx summed over the dims. A max's tangent is dx
    at its argmax, ties shared as autograd's backward shares them."""
    node, dims, keepdim = args
    shape, dtype = meta[0]
    slopes = node(torch.ones(shape, dtype=dtype, device=targs[0].device)) * targs[0]
    return slopes.sum() if dims is None else slopes.sum(dims, keepdim)


def _reduced_over(n):
    """(the node, its dims (None: all), keepdim): var, std, norms, amax, logsumexp, max.dim."""
    dim = n._saved_dim
    dims = None if dim is None or dim == () else _dims([dim] if isinstance(dim, int) else dim)
    return (n, dims, n._saved_keepdim), (None,), {}


def _where(args, targs, outs, meta, kwargs):
    """where(c, a, b): where(c, da, db), a side without a tangent contributing zeros."""
    return torch.where(args[0], *(0.0 if t is None else t for t in targs[1:]))


def _stack(args, targs, outs, meta, kwargs):
    """stack(xs, dim): the tangents stacked, zeros for inputs without one (all of one shape)."""
    like = next(t for t in targs if t is not None)
    return torch.stack([like.new_zeros(like.shape) if t is None else t for t in targs], args[0])


def _max_pool(args, targs, outs, meta, kwargs):
    """max_pool2d, adaptive_max_pool2d: the tangent at each window's maximum, read off the
    forward's indices (flat in each input plane)."""
    indices = outs[1]
    return targs[0].flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)


def _layer_norm(args, targs, outs, meta, kwargs):
    """y = γ ⊙ x̂ + β, x̂ = (x − μ)·r over the normalized dims: dy = γ ⊙ N(dx) + dγ ⊙ x̂ + dβ,
    where N, the normalization's Jacobian r·(I − 11ᵀ/M − x̂x̂ᵀ/M), is symmetric: the layer
    norm's backward without weight. γ varies along the normalized dims, so it multiplies
    afterwards (a batch norm's γ is constant where it normalizes, and commutes)."""
    x, shape, weight, mean, rstd = args
    dx, dw, db = targs[0], targs[2], targs[3]
    terms = []
    if dx is not None:
        # A 16-bit input normalized in float32 (autocast's CPU layer norm): in float32 too.
        n = aten.native_layer_norm_backward(dx.to(mean.dtype), x.to(mean.dtype), shape, mean,
                                            rstd, None, None, [True, False, False])[0]
        terms.append(n if weight is None else n * weight)
    if dw is not None:
        terms.append((x - mean) * rstd * dw)
    terms.append(db)
    return (_sum(terms),) + (None,) * (len(meta) - 1)


def _group_norm(args, targs, outs, meta, kwargs):
    """Group norm, x of [N, C, *] normalized over each sample's groups of C/G channels: the
    layer norm's tangent (above) with γ and β per channel, N the group norm's backward without
    weight."""
    x, weight, mean, rstd, n, c, hw, group = args
    dx, dw, db = targs[:3]
    per_channel = (c,) + (1,) * (x.dim() - 2)
    terms = []
    if dx is not None:       # its kernel reads dx as contiguous (a bias's tangent is expanded)
        normalized = aten.native_group_norm_backward(dx.to(mean.dtype).contiguous(),
                                                     x.to(mean.dtype), mean, rstd, None, n, c,
                                                     hw, group, [True, False, False])[0]
        terms.append(normalized if weight is None else normalized * weight.view(per_channel))
    if dw is not None:
        x_hat = (x.reshape(n, group, -1) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
        terms.append(x_hat.view(x.shape) * dw.view(per_channel))
    if db is not None:
        terms.append(db.view(per_channel))
    return (_sum(terms),) + (None,) * (len(meta) - 1)


def _softmax(args, targs, outs, meta, kwargs):
    """y = softmax(x): dy = y ⊙ (dx − ⟨y, dx⟩), the softmax's backward (its Jacobian is
    symmetric)."""
    y = outs[0]
    return aten._softmax_backward_data(targs[0], y, args[1], y.dtype)


def _log_softmax(args, targs, outs, meta, kwargs):
    """y = log softmax(x): dy = dx − ⟨softmax(x), dx⟩."""
    dim = args[1]
    return targs[0] - (outs[0].exp() * targs[0]).sum(dim, keepdim=True)


def _concatenation(args, targs, outs, meta, kwargs):
    """cat(xs, dim): the tangents concatenated, zeros for inputs without one. An input that
    autograd does not track has no size in the graph; one such input's is what the output
    leaves, more cannot be placed."""
    dim, sizes = args
    if sum(size is None for size, t in zip(sizes, targs) if t is None) > 1:
        raise UnsupportedForward("a concatenation of several tensors that autograd does not "
                                 "track: their sizes are not in the graph")
    shape = list(meta[0][0])
    known = sum(size for size in sizes if size is not None)
    like = next(t for t in targs if t is not None)
    parts = []
    for size, t in zip(sizes, targs):
        if t is None:
            shape[dim] = size if size is not None else meta[0][0][dim] - known
            t = like.new_zeros(shape)
        parts.append(t)
    return torch.cat(parts, dim)


def _concatenated(n):
    """cat: (dim, per input its size along dim where autograd tracks it)."""
    dim = _dims([n._saved_dim])[0]
    sizes = [child._input_metadata[k].shape[dim] if child is not None else None
             for child, k in n.next_functions]
    return (dim, sizes), (None,), {}


def _split(args, targs, outs, meta, kwargs):
    """split / split_with_sizes (a size or sizes) / unbind (None): the tangent cut the same
    way."""
    cut, dim = args
    return targs[0].unbind(dim) if cut is None else targs[0].split(cut, dim)


def _embedding(args, targs, outs, meta, kwargs):
    """weight[indices]: dweight[indices]."""
    return aten.embedding(targs[0], args[1])


def _embedding_bag(args, targs, outs, meta, kwargs):
    """embedding_bag(W, indices, offsets, mode) is linear in W where the bags are fixed: sum
    and mean bags of dW (with the per-sample weights), and for max dW at each bag's argmax per
    column (none in an empty bag). A tangent of the per-sample weights would need W, which the
    node does not keep: refused."""
    indices, offsets, mode, weights, padding_idx, bag_size, argmax = args
    dw, dweights = targs
    if dweights is not None:
        raise UnsupportedForward("embedding_bag: a tangent of its per-sample weights")
    if mode == 2:
        return torch.where((bag_size > 0)[:, None], dw.gather(0, argmax), 0.0)
    include_last_offset = offsets.numel() == meta[0][0][0] + 1
    return aten._embedding_bag(dw, indices, offsets, False, mode, False, weights,
                               include_last_offset, padding_idx)[0]


def _glu(args, targs, outs, meta, kwargs):
    """glu(x) = a ⊙ σ(b), x = [a, b] halved along dim: da ⊙ σ(b) + a ⊙ σ(b)(1 − σ(b)) ⊙ db."""
    x, dim = args
    a, b = x.chunk(2, dim)
    da, db = targs[0].chunk(2, dim)
    gate = torch.sigmoid(b)
    return da * gate + a * gate * (1 - gate) * db


def _output_shape(n):
    """(None, the node's output shape): the arguments of a view, reshape or expand."""
    return (None, list(n._input_metadata[0].shape)), (None,), {}


# Views, reshapes, squeezes, flattens: the tangent in the output's shape.
_SHAPE_ONLY = _of(aten.view.default, (0,), _output_shape)

NODES = {
    "ConvolutionBackward0": _of(aten.convolution.default, (0, 1, 2), _convolution),
    "NativeBatchNormBackward0": _of(aten.native_batch_norm.default, (0, 1, 2), _batch_norm),
    "CudnnBatchNormBackward0": _of(aten.cudnn_batch_norm.default, (0, 1, 2), _batch_norm),
    "AddBackward0": _of(aten.add.Tensor, (0, 1),
                        lambda n: ((None, None), (None,), {"alpha": n._saved_alpha})),
    "SubBackward0": _of(aten.sub.Tensor, (0, 1),
                        lambda n: ((None, None), (None,), {"alpha": n._saved_alpha})),
    "MaxPool2DWithIndicesBackward0": _Node(_max_pool, (0,), lambda n: (
        (None,), (None, n._saved_result1), {})),
    "MulBackward0": _of(aten.mul.Tensor, (0, 1),
                        lambda n: ((n._saved_self, n._saved_other), (None,), {})),
    "DivBackward0": _Node(_divide, (0, 1), lambda n: ((n._saved_self, n._saved_other),
                                                     (None,), {})),
    "MmBackward0": _of(aten.mm.default, (0, 1),
                       lambda n: ((n._saved_self, n._saved_mat2), (None,), {})),
    "BmmBackward0": _of(aten.bmm.default, (0, 1),
                        lambda n: ((n._saved_self, n._saved_mat2), (None,), {})),
    "AddmmBackward0": _of(aten.addmm.default, (0, 1, 2), lambda n: (
        (None, n._saved_mat1, n._saved_mat2), (None,),
        {"beta": n._saved_beta, "alpha": n._saved_alpha})),
    "TBackward0": _of(aten.t.default, (0,), _nothing_saved(1)),
    "TransposeBackward0": _of(aten.transpose.int, (0,), lambda n: (
        (None, *_dims([n._saved_dim0, n._saved_dim1])), (None,), {})),
    "PermuteBackward0": _of(aten.permute.default, (0,),
                            lambda n: ((None, _dims(n._saved_dims)), (None,), {})),
    "MeanBackward0": _of(aten.mean.default, (0,), _nothing_saved(1)),
    "MeanBackward1": _of(aten.mean.dim, (0,),
                         lambda n: ((None, _dims(n._saved_dim), n._saved_keepdim), (None,), {})),
    "SumBackward0": _of(aten.sum.default, (0,), _nothing_saved(1)),
    "SumBackward1": _of(aten.sum.dim_IntList, (0,),
                        lambda n: ((None, _dims(n._saved_dim), n._saved_keepdim), (None,), {})),
    "AvgPool2DBackward0": _of(aten.avg_pool2d.default, (0,), lambda n: (
        (None, list(n._saved_kernel_size), list(n._saved_stride), list(n._saved_padding),
         n._saved_ceil_mode,
         n._saved_count_include_pad, n._saved_divisor_override), (None,), {})),
    "AdaptiveAvgPool2DBackward0": _of(aten._adaptive_avg_pool2d.default, (0,), lambda n: (
        (None, list(n._input_metadata[0].shape)[-2:]), (None,), {})),
    "ViewBackward0": _SHAPE_ONLY,
    "UnsafeViewBackward0": _SHAPE_ONLY,
    "SqueezeBackward1": _SHAPE_ONLY,
    "UnsqueezeBackward0": _SHAPE_ONLY,
    "ExpandBackward0": _of(aten.expand.default, (0,), _output_shape),
    "ToCopyBackward0": _of(aten._to_copy.default, (0,), lambda n: (
        (None,), (None,), {"dtype": n._input_metadata[0].dtype,
                           "device": n._input_metadata[0].device})),
    "CloneBackward0": _Node(_identity, (0,), _nothing_saved(1)),     # a clone: dx
    "NativeLayerNormBackward0": _Node(_layer_norm, (0, 2, 3), lambda n: (
        (n._saved_input, list(n._saved_normalized_shape), n._saved_weight, n._saved_result1,
         n._saved_result2), (None,), {})),
    "SoftmaxBackward0": _Node(_softmax, (0,), lambda n: (
        (None, _dims([n._saved_dim])[0]), (n._saved_result,), {})),
    "LogSoftmaxBackward0": _Node(_log_softmax, (0,), lambda n: (
        (None, _dims([n._saved_dim])[0]), (n._saved_result,), {})),
    "CatBackward0": _Node(_concatenation, None, _concatenated),
    "SplitBackward0": _Node(_split, (0,), lambda n: (
        (n._saved_split_size, _dims([n._saved_dim])[0]), (None,), {})),
    "SplitWithSizesBackward0": _Node(_split, (0,), lambda n: (
        (list(n._saved_split_sizes), _dims([n._saved_dim])[0]), (None,), {})),
    "UnbindBackward0": _Node(_split, (0,), lambda n: ((None, _dims([n._saved_dim])[0]),
                                                      (None,), {})),
    "EmbeddingBackward0": _Node(_embedding, (0,), lambda n: (
        (None, n._saved_indices), (None,), {})),
    "EmbeddingBagBackward0": _Node(_embedding_bag, None, lambda n: (
        (n._saved_indices, n._saved_offsets, n._saved_mode, n._saved_per_sample_weights,
         _dims([n._saved_padding_idx])[0], n._saved_result2, n._saved_result3), (None,), {})),
    "GluBackward0": _Node(_glu, (0,), lambda n: ((n._saved_self, _dims([n._saved_dim])[0]),
                                                 (None,), {})),
    "MkldnnRnnLayerBackward0": _Node(onednn_lstm_layer, (0, 1, 2, 3, 4, 5, 6), lambda n: (
        (n._saved_input, n._saved_weight0, n._saved_weight1, n._saved_weight2,
         n._saved_weight3, n._saved_hx_, n._saved_cx_, n._saved_reverse), (None,), {})),
    "CudnnRnnBackward0": _Node(cudnn_rnn, None, read_cudnn_rnn),
    "SafeSoftmaxBackward0": _Node(_softmax, (0,), lambda n: (
        (None, _dims([n._saved_dim])[0]), (n._saved_result,), {})),
    "ReshapeAliasBackward0": _SHAPE_ONLY,
    "AddBackward1": _Node(_identity, (0,), _nothing_saved(1)),        # x + a number: dx
    "MulBackward1": _linear(aten.mul.Scalar, lambda n: ((None, n._saved_other), (None,), {})),
    "SelectBackward0": _linear(aten.select.int, lambda n: (
        (None, *_dims([n._saved_dim, n._saved_index])), (None,), {})),
    "SliceBackward0": _linear(aten.slice.Tensor, lambda n: (
        (None, *_dims([n._saved_dim, n._saved_start, n._saved_end]), n._saved_step), (None,),
        {})),
    "ConstantPadNdBackward0": _linear(aten.constant_pad_nd.default, lambda n: (
        (None, _dims(n._saved_pad)), (None,), {})),        # the padding's value is a constant
    "RollBackward0": _linear(aten.roll.default, lambda n: (
        (None, _dims(n._saved_shifts), _dims(n._saved_dims)), (None,), {})),
    "FlipBackward0": _linear(aten.flip.default, lambda n: ((None, _dims(n._saved_dims)),
                                                           (None,), {})),
    "RepeatBackward0": _linear(aten.repeat.default, lambda n: ((None, list(n._saved_repeats)),
                                                               (None,), {})),
    "GatherBackward0": _linear(aten.gather.default, lambda n: (
        (None, _dims([n._saved_dim])[0], n._saved_index), (None,), {})),
    "IndexBackward0": _linear(aten.index.Tensor, lambda n: ((None, list(n._saved_indices)),
                                                            (None,), {})),
    "MaskedFillBackward0": _linear(aten.masked_fill.Scalar, lambda n: (
        (None, n._saved_mask, 0.0), (None,), {})),
    "WhereBackward0": _Node(_where, (1, 2), lambda n: ((n._saved_condition, None, None),
                                                       (None,), {})),
    "StackBackward0": _Node(_stack, None, lambda n: ((_dims([n._saved_dim])[0],), (None,), {})),
    "PreluKernelBackward0": _Node(_prelu, (0, 1), lambda n: ((n._saved_self, n._saved_weight),
                                                             (None,), {})),
    "NativeGroupNormBackward0": _Node(_group_norm, (0, 1, 2), lambda n: (
        (n._saved_input, n._saved_weight, n._saved_result1, n._saved_result2, n._saved_N,
         n._saved_C, n._saved_HxW, n._saved_group), (None,), {})),
    "UpsampleNearest2DBackward0": _upsampling(aten.upsample_nearest2d.default, False),
    "UpsampleNearestExact2DBackward0": _upsampling(aten._upsample_nearest_exact2d.default,
                                                   False),
    "UpsampleBilinear2DBackward0": _upsampling(aten.upsample_bilinear2d.default, True),
    "UpsampleBicubic2DBackward0": _upsampling(aten.upsample_bicubic2d.default, True),
    "PixelShuffleBackward0": _linear(aten.pixel_shuffle.default, lambda n: (
        (None, n._saved_upscale_factor), (None,), {})),
    "PixelUnshuffleBackward0": _linear(aten.pixel_unshuffle.default, lambda n: (
        (None, n._saved_downscale_factor), (None,), {})),
    "ChannelShuffleBackward0": _linear(aten.channel_shuffle.default, lambda n: (
        (None, n._saved_groups), (None,), {})),
    "Im2ColBackward0": _linear(aten.im2col.default, lambda n: ((None, *_window(n)), (None,),
                                                               {})),
    "Col2ImBackward0": _linear(aten.col2im.default, lambda n: (
        (None, list(n._input_metadata[0].shape)[-2:], *_window(n)), (None,), {})),
    "CumsumBackward0": _linear(aten.cumsum.default, lambda n: (
        (None, _dims([n._saved_dim])[0]), (None,), {})),
    "TrilBackward0": _linear(aten.tril.default, lambda n: (
        (None, *_dims([n._saved_diagonal])), (None,), {})),
    "TriuBackward0": _linear(aten.triu.default, lambda n: (
        (None, *_dims([n._saved_diagonal])), (None,), {})),
    "DiagonalBackward0": _linear(aten.diagonal.default, lambda n: (
        (None, *_dims([n._saved_offset, n._saved_dim1, n._saved_dim2])), (None,), {})),
    # Fused attention kernels: the tape's rule, forward-mode autograd through the math kernel.
    "ScaledDotProductFlashAttentionForCpuBackward0": _of(
        aten._scaled_dot_product_flash_attention_for_cpu.default, (0, 1, 2), lambda n: (
            (n._saved_query, n._saved_key, n._saved_value, n._saved_dropout_p,
             n._saved_is_causal), (None, None),
            {"attn_mask": n._saved_attn_mask, "scale": n._saved_scale})),
    "ScaledDotProductFlashAttentionBackward0": _of(
        aten._scaled_dot_product_flash_attention.default, (0, 1, 2), lambda n: (
            (n._saved_query, n._saved_key, n._saved_value, n._saved_dropout_p,
             n._saved_is_causal), (None,), {"scale": n._saved_scale})),
    "ScaledDotProductEfficientAttentionBackward0": _biased_attention(
        aten._scaled_dot_product_efficient_attention.default),
    "ScaledDotProductCudnnAttentionBackward0": _biased_attention(
        aten._scaled_dot_product_cudnn_attention.default),
}

# An in-place transpose and the unsafe splits of the CPU's recurrent layers, and adaptive max
# pooling (indices flat in each plane too): their twins' reads.
NODES.update({"TransposeBackward1": NODES["TransposeBackward0"],
              "UnsafeSplitBackward0": NODES["SplitBackward0"],
              "UnsafeSplitWithSizesBackward0": NODES["SplitWithSizesBackward0"],
              "AdaptiveMaxPool2DBackward0": NODES["MaxPool2DWithIndicesBackward0"]})

# Reductions over dims, each element of the input feeding one of the output (_reduction).
NODES.update(dict.fromkeys(
    ("VarBackward0", "StdBackward0", "LinalgVectorNormBackward0", "AmaxBackward0",
     "AminBackward0", "LogsumexpBackward0", "ProdBackward1", "MaxBackward0", "MinBackward0"),
    _Node(_reduction, (0,), _reduced_over)))
NODES.update(dict.fromkeys(("MaxBackward1", "MinBackward1", "ProdBackward0"), _Node(
    _reduction, (0,), lambda n: ((n, None, False), (None,), {}))))

# Elementwise functions, in place or not: activations, dropout, pointwise math of one tensor
# (a rounding's tangent is zero), and of several tensors of one shape.
ELEMENTWISE = (
    "ReluBackward0", "ThresholdBackward0", "ThresholdBackward1", "HardtanhBackward0",
    "LeakyReluBackward0", "LeakyReluBackward1", "RreluWithNoiseBackward0", "EluBackward0",
    "EluBackward1", "CeluBackward0", "CeluBackward1", "SoftplusBackward0", "TanhBackward0",
    "SigmoidBackward0", "LogSigmoidBackward0", "SiluBackward0", "GeluBackward0", "MishBackward0",
    "HardswishBackward0", "HardsigmoidBackward0", "HardshrinkBackward0", "SoftshrinkBackward0",
    "NativeDropoutBackward0", "NegBackward0", "RsubBackward1", "AbsBackward0", "ClampBackward1",
    "ClampMinBackward0", "ClampMaxBackward0", "PowBackward0", "PowBackward2", "ExpBackward0",
    "Exp2Backward0", "Expm1Backward0", "LogBackward0", "Log2Backward0", "Log10Backward0",
    "Log1PBackward0", "LogitBackward0", "SqrtBackward0", "RsqrtBackward0", "ReciprocalBackward0",
    "SinBackward0", "CosBackward0", "TanBackward0", "SinhBackward0", "CoshBackward0",
    "AsinBackward0", "AcosBackward0", "AtanBackward0", "AtanhBackward0", "ErfBackward0",
    "ErfcBackward0", "ErfinvBackward0", "SignBackward0", "RoundBackward0", "FloorBackward0",
    "CeilBackward0", "TruncBackward0", "FracBackward0",
    "MaximumBackward0", "MinimumBackward0", "AddcmulBackward0", "AddcdivBackward0",
    "LerpBackward0", "LerpBackward1", "Atan2Backward0", "PowBackward1", "HypotBackward0")
NODES.update(dict.fromkeys(ELEMENTWISE, _Node(_elementwise, None,
                                              lambda n: ((n,), (None,), {}))))

_LEAF = "AccumulateGrad"


def _nodes(output: Tensor):
    """The graph's nodes in an order where each comes after the nodes it reads (depth-first,
    iterative: graphs are deep), and how many inputs of other nodes each one feeds."""
    order, uses, seen = [], {}, set()
    stack = [(output.grad_fn, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for child, _ in node.next_functions:
            if child is not None:
                uses[child] = uses.get(child, 0) + 1
                if child not in seen:
                    stack.append((child, False))
    return order, uses


def readable(output: Tensor) -> bool:
    """Whether `graph_jvp` covers every node of the graph that computed `output`."""
    if output.grad_fn is None:
        return True
    return all(type(n).__name__ in NODES or type(n).__name__ == _LEAF
               for n in _nodes(output)[0])


def graph_jvp(output: Tensor, sources: Sequence[Tensor], tangents: Sequence[Tensor]) -> Tensor:
    """J·tangents for `output`, a tensor computed with autograd from the `sources` (leaves that
    require grad; a tangent per source, same shape and dtype), from its graph alone.

    The graph must still hold its saved tensors (a backward through it since needs
    retain_graph). Raises UnsupportedForward (module docstring)."""
    if len(tangents) != len(sources):
        raise ValueError(f"graph_jvp: {len(tangents)} tangents for {len(sources)} sources")
    if output.grad_fn is None:
        return torch.zeros_like(output)
    source_of = {id(p): t for p, t in zip(sources, tangents)}
    order, uses = _nodes(output)
    tan: dict = {}
    with torch.no_grad():
        for node in order:
            name = type(node).__name__
            if name == _LEAF:
                tan[node] = (source_of.get(id(node.variable)),)
                continue
            spec = NODES.get(name)
            if spec is None:
                raise UnsupportedForward(f"no tangent rule for the autograd node {name}")
            inputs = [tan[child][k] if child is not None else None
                      for child, k in node.next_functions]
            for child, _ in node.next_functions:
                if child is not None:
                    uses[child] -= 1
                    if uses[child] == 0:
                        del tan[child]
            meta = tuple((tuple(m.shape), m.dtype) for m in node._input_metadata)
            if all(t is None for t in inputs):
                tan[node] = (None,) * len(meta)
                continue
            try:       # a saved tensor changed in place or freed; another torch's names
                args, outs, kwargs = spec.read(node)
            except (RuntimeError, AttributeError) as e:
                raise UnsupportedForward(f"{name}: {e}") from e
            if spec.edges is None:                        # one argument per input
                targs = inputs
            else:
                targs = [None] * len(args)
                for position, t in zip(spec.edges, inputs):
                    targs[position] = t
            try:
                result = spec.rule(args, targs, outs, meta, kwargs)
            except (RuntimeError, NotImplementedError) as e:
                raise UnsupportedForward(f"the tangent of {name}: {e}") from e
            result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
            tan[node] = tuple(_shaped(t, m) for t, m in zip(result, meta))
    z = tan[output.grad_fn][output.output_nr]
    return torch.zeros_like(output) if z is None else z
