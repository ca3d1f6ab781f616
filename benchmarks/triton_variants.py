"""Times the Triton loss ops under variants of the launch table, interleaved, on a GPU.

    python benchmarks/triton_variants.py --shape 8192x128256 --dtype bfloat16 \\
        "" "ALTERNATE_PASSES=False" "LONG_ROWS['double_backward']=(4096, 8)"

Each variant is a Python statement run in kdops._triton.launch ("" is the table as it is);
the op's kernels recompile for it. Per variant and op (the forward; the backward to the
student; the double backward of MetaDistil's product, ∂⟨v, ∂L/∂s⟩/∂(s, t)): the median of
triton.testing.do_bench (CUDA events) over `--rounds` rounds, the variants taking turns in
each round, so that a drift of the clock or the card's temperature hits them alike. Every
variant's outputs must match the first's to rounding (`_tolerance`). Prints a table and
writes the numbers as JSON (--json).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton.testing

import kdops  # noqa: F401  (registers the ops)
from kdops._triton import launch

sys.path.insert(0, str(Path(__file__).parent))
from measure import git_sha  # noqa: E402

TEMPERATURE = 2.0


def _ops(s, t, v, divergence):
    """The three ops on these logits, as closures, with the forward's statistics."""
    n = s.shape[0]
    tau = torch.full((n,), TEMPERATURE, device=s.device)
    grad_div = torch.full((n,), TEMPERATURE ** 2 / n, device=s.device)  # batchmean · T²
    grad_ce = torch.zeros(n, device=s.device)
    common = (s, t, tau, tau, None)
    args = dict(ignore_index=-100, divergence=divergence, beta=0.5, with_ce=False)
    _, _, stats = launch.kd_forward(*common, **args)
    return {
        "forward": lambda: launch.kd_forward(*common, **args),
        "backward": lambda: launch.kd_backward(grad_div, grad_ce, *common, stats,
                                               output_mask=(True, False, False, False),
                                               **args),
        "double_backward": lambda: launch.kd_double_backward(
            v, None, None, None, grad_div, grad_ce, *common, stats,
            output_mask=(False, False, True, True, False, False), **args),
    }


def _tolerance(x):
    """Another tile sums a row in another order: its rounding may move a [N, V] output by one
    unit of the logits' dtype (where it rounds to bf16, 2⁻⁸ relative)."""
    if x.element_size() == 2:
        return dict(rtol=2 ** -7, atol=1e-6)
    return dict(rtol=1e-5, atol=1e-6)


def _snapshot():
    """The launch module's globals, its tables copied (a variant may change them in place)."""
    return {k: dict(x) if isinstance(x, dict) else x for k, x in vars(launch).items()}


def _restore(table):
    launch.__dict__.update({k: dict(x) if isinstance(x, dict) else x for k, x in table.items()})


def main():
    shape = tuple(int(d) for d in OPTIONS.shape.split("x"))
    dtype = getattr(torch, OPTIONS.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    s, t, v = ((torch.randn(shape, generator=g, device="cuda") * scale).to(dtype)
               for scale in (3.0, 3.0, 1.0))
    ops = _ops(s, t, v, OPTIONS.divergence)
    table = _snapshot()
    times = {(variant, op): [] for variant in OPTIONS.variants for op in ops}
    first = {}
    for round_ in range(OPTIONS.rounds):
        for variant in OPTIONS.variants:
            _restore(table)
            exec(variant, launch.__dict__)
            for op, fn in ops.items():
                out = fn()
                if round_ == 0:
                    want = first.setdefault(op, out)
                    for a, b in zip(out, want):
                        torch.testing.assert_close(a, b, **_tolerance(a), msg=variant)
                times[variant, op].append(triton.testing.do_bench(fn, return_mode="median"))
    _restore(table)
    rows = [dict(variant=variant or "(as is)", op=op, median_ms=statistics.median(ms),
                 rounds_ms=ms) for (variant, op), ms in times.items()]
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, git_sha=git_sha(),
                  shape=list(shape), dtype=OPTIONS.dtype, divergence=OPTIONS.divergence,
                  rows=rows)
    if OPTIONS.json:
        with open(OPTIONS.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{OPTIONS.divergence} {OPTIONS.shape} {OPTIONS.dtype}: median ms")
    for row in rows:
        print(f"  {row['variant'][:50]:<50} {row['op']:<16} {row['median_ms']:8.3f}")


PARSER = argparse.ArgumentParser(description=__doc__.split("\n")[0])
PARSER.add_argument("variants", nargs="+")
PARSER.add_argument("--shape", default="8192x128256")
PARSER.add_argument("--dtype", default="bfloat16")
PARSER.add_argument("--divergence", default="kl")
PARSER.add_argument("--rounds", type=int, default=5)
PARSER.add_argument("--json")

if __name__ == "__main__":
    OPTIONS = PARSER.parse_args()
    main()
