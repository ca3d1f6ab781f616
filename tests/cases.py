"""Shared input builders for the kdops tests: fresh random inputs, never zeros."""
import torch

DIVERGENCES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]
DIVERGENCE_IDS = ["kl", "reverse_kl", "jsd0.3", "jsd0", "jsd1"]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


def logits(*shape, dtype=torch.float32, seed=0, spread=3.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * spread).to(dtype)
    return x.requires_grad_(requires_grad)


def temperatures(mode, lead, dtype=torch.float64, seed=1, requires_grad=True):
    """(τs, τt) for a mode: 'float', 'scalar' (0-dim tensors) or 'row' (one per row)."""
    if mode == "float":
        return 2.0, 1.5
    g = torch.Generator().manual_seed(seed)
    shape = () if mode == "scalar" else lead
    ts = (torch.rand(shape, generator=g, dtype=dtype) + 0.5).requires_grad_(requires_grad)
    tt = (torch.rand(shape, generator=g, dtype=dtype) + 0.5).requires_grad_(requires_grad)
    return ts, tt


def positive(*shape, seed=3, dtype=torch.float32):
    """Temperatures-like values in [0.5, 1.5), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)


def labels_for(lead, v, mode, seed=2):
    """(labels, alpha) for a mode: None, 'mask' (some rows ignored) or 'ce' (mask + CE term)."""
    if mode is None:
        return None, None
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, lead, generator=g)
    labels.view(-1)[::2] = -100
    return labels, (0.7 if mode == "ce" else None)


def mask_vocab(x, columns):
    """x with the given vocabulary columns set to -inf (a masked vocabulary)."""
    x = x.detach().clone()
    x[..., columns] = float("-inf")
    return x
