"""kdops.compat's adapters vs the losses they replace, forward + backward (pytest-benchmark).

    python -m pytest benchmarks/bench_compat.py
    KDOPS_BENCH_COMPAT_SHAPES=64x100,4x128x32000 python -m pytest benchmarks/bench_compat.py
    KDOPS_BENCH_DEVICE=cuda python -m pytest benchmarks/bench_compat.py

Each adapter against its original as that codebase writes it (`kdops.reference`), on the
student's gradient, fp32, at shapes of its field: the CV losses on ImageNet-sized logits
(256 × 1000, T = 4; torchdistill with α = 0.5 and targets), TRL's generalized JSD on a batch
of sequences (2 × 256 positions × 32000 vocabulary, about 30% of the positions labelled -100,
β = 0.5, T = 2); KDOPS_BENCH_COMPAT_SHAPES sets the two shapes (the CV one may have spatial
dims: classes on dim 1). Each case first checks its loss and gradient against the
original's, and records in extra_info the peak memory it allocates beyond its inputs (MiB:
the CUDA allocator's peak on a GPU, peak RSS on a Linux CPU).
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from kdops import reference
from kdops.compat import mdistiller, repdistiller, torchdistill, trl

sys.path.insert(0, str(Path(__file__).parent))
from measure import DEVICE, DEVICE_NAME, peak_extra, synchronize  # noqa: E402

CV_SHAPE, LM_SHAPE = (tuple(int(d) for d in shape.split("x")) for shape in os.environ.get(
    "KDOPS_BENCH_COMPAT_SHAPES", "256x1000,2x256x32000").split(","))


def _torchdistill_kdops():
    loss = torchdistill.KDLoss("fc", "output", "fc", "output", 4.0, alpha=0.5)
    return lambda s, t, y: loss({"fc": {"output": s}}, {"fc": {"output": t}}, y)


# name: (shape, kdops adapter, original), each called as fn(student, teacher, labels)
CASES = {
    "repdistiller_distill_kl": (CV_SHAPE, lambda s, t, y: repdistiller.DistillKL(4.0)(s, t),
                                lambda s, t, y: reference.repdistiller_distill_kl(s, t, 4.0)),
    "mdistiller_kd_loss_logit_stand": (
        CV_SHAPE, lambda s, t, y: mdistiller.kd_loss(s, t, 4.0, logit_stand=True),
        lambda s, t, y: reference.mdistiller_kd_loss(s, t, 4.0, logit_stand=True)),
    "torchdistill_kd_loss": (CV_SHAPE, _torchdistill_kdops(),
                             lambda s, t, y: reference.torchdistill_kd_loss(s, t, y, 4.0, 0.5)),
    "trl_generalized_jsd_loss": (
        LM_SHAPE, lambda s, t, y: trl.generalized_jsd_loss(s, t, y, 0.5, 2.0),
        lambda s, t, y: reference.trl_generalized_jsd_loss(s, t, y, 0.5, 2.0)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    shape, adapter, original = CASES[request.param]
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3
    lm = request.param.startswith("trl")
    classes = -1 if lm else 1
    lead = tuple(d for k, d in enumerate(shape) if k != classes % len(shape))
    labels = torch.randint(0, shape[classes], lead, generator=g)
    if lm:
        labels[torch.rand(lead, generator=g) < 0.3] = -100
    s, t, labels = s.to(DEVICE), t.to(DEVICE), labels.to(DEVICE)
    return request.param, s, t, labels, {"kdops": adapter, "original": original}


def _forward_backward(fn, s, t, labels):
    s = s.detach().requires_grad_()
    loss = fn(s, t, labels)
    loss.backward()
    synchronize()
    return loss.detach(), s.grad


@pytest.mark.parametrize("impl", ["kdops", "original"])
def test_compat(benchmark, case, impl):
    name, s, t, labels, impls = case
    args = (impls[impl], s, t, labels)
    for got, want in zip(_forward_backward(*args),
                         _forward_backward(impls["original"], s.double(), t.double(), labels)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    benchmark.group = f"{name} {'x'.join(map(str, s.shape))}"
    benchmark.extra_info.update(
        impl=impl, case=name, shape=list(s.shape), device=DEVICE_NAME,
        threads=torch.get_num_threads(), torch=torch.__version__,
        peak_extra_mib=peak_extra(_forward_backward, args, 2 ** 20, DEVICE))
    benchmark.pedantic(_forward_backward, args=args, rounds=10 if s.numel() > 1e7 else 100,
                       warmup_rounds=1)
