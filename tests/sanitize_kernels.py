"""Run every kdops CUDA kernel once, for compute-sanitizer (needs a CUDA device).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python tests/sanitize_kernels.py

Without the caching allocator each tensor is its own allocation, so memcheck sees an access
past a tensor's end instead of landing in a neighbour's block of the same pool. Covered:
the Triton loss kernels (forward, backward, second order) for the KL and the JSD on short
rows (V = 100, several rows per program) and long rows (V = 128256, streamed in blocks), with
per-row temperatures that require grad, labels and an ignored row, plus grad_in_forward; and
the CUDA pilot-step kernels forward and backward on a mixed-dtype list.
"""
import torch

import kdops


def loss_kernels(n, v, divergence, dtype):
    s = torch.randn(n, v, device="cuda", dtype=dtype, requires_grad=True)
    t = torch.randn(n, v, device="cuda", dtype=dtype, requires_grad=True)
    tau = torch.full((n,), 2.0, device="cuda", requires_grad=True)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[0] = -100
    loss = kdops.fused_kd_loss(s, t, temperature=tau, divergence=divergence, beta=0.3,
                               labels=labels, alpha=0.7)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    torch.autograd.grad(g, (s, t, tau), grad_outputs=torch.randn_like(g))
    s_first = s.detach().requires_grad_()
    kdops.fused_kd_loss(s_first, t.detach(), temperature=2.0, divergence=divergence,
                        grad_in_forward=True).backward()


def pilot_kernels():
    dtypes = [torch.float32, torch.bfloat16, torch.float16] * 3
    params = [torch.randn(1 + 997 * i, device="cuda", dtype=d, requires_grad=True)
              for i, d in enumerate(dtypes)]
    grads = [torch.randn_like(p, requires_grad=True) for p in params]
    lr = torch.tensor(0.1, device="cuda", requires_grad=True)
    new = kdops.pilot_sgd_step(params, grads, lr, weight_decay=1e-4, momentum=0.9)
    torch.autograd.grad(sum(p.float().sum() for p in new), [*params, *grads, lr])


def main():
    for divergence in ("kl", "jsd"):
        for n, v in ((64, 100), (4, 128256)):
            for dtype in (torch.float32, torch.bfloat16):
                loss_kernels(n, v, divergence, dtype)
    pilot_kernels()
    torch.cuda.synchronize()
    print("sanitize_kernels: every kernel ran;", kdops.backend_info())


if __name__ == "__main__":
    main()
