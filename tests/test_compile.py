"""torch.compile(fullgraph=True) traces a training step through the registered ops.

Dynamo does not trace `Tensor.backward()` itself; the compiled forward (student, teacher, loss)
comes with an AOT-compiled backward graph, which is where kdops::kd_backward runs.
"""
import torch

import kdops
from cases import labels_for, logits


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    student = torch.nn.Linear(16, 11)
    teacher = torch.nn.Linear(16, 11)
    tau = torch.nn.Parameter(torch.tensor(2.0))
    x = logits(8, 16, seed=3)
    labels = labels_for((8,), 11, "ce")[0]

    def forward(x):
        with torch.no_grad():
            t = teacher(x)
        return kdops.fused_kd_loss(student(x), t, temperature=tau, labels=labels, alpha=0.5,
                                   divergence="jsd", beta=0.4)

    eager_loss = forward(x)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in (*student.parameters(), tau)]
    for p in (*student.parameters(), tau):
        p.grad = None
    compiled_loss = torch.compile(forward, fullgraph=True, backend="aot_eager")(x)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for p, g in zip((*student.parameters(), tau), eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_inductor_compiles_loss_and_backward():
    s = logits(6, 13, requires_grad=True)
    t = logits(6, 13, seed=1)

    def f(s, t):
        return kdops.fused_kd_loss(s, t, temperature=3.0, reduction="sum")

    out = torch.compile(f, fullgraph=True)(s, t)
    (g,) = torch.autograd.grad(out, s)
    (g_eager,) = torch.autograd.grad(f(s, t), s)
    torch.testing.assert_close(g, g_eager)
