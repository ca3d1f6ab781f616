"""kdops' demo: plain KD vs MetaDistil vs MKD on scikit-learn's digits, every meta-gradient mode.

    python -m kdops.demo                 # about a minute on a 2-core CPU; a GPU when present
    python -m kdops.demo --epochs 2 --teacher-epochs 2 --out /tmp/demo.png

A teacher MLP (64-256-256-10) is trained on the digits' training split, then a small student
(64-24-10) learns from it in several ways, each from the same initialization: cross-entropy
alone, plain KD (Hinton, τ = 4), MetaDistil (the teacher keeps learning from the student's quiz
loss) and MKD (τ learned, log-space). The meta-learned methods run once per meta-gradient mode:
"jvp" (graph-free), "autograd" (create_graph) and "finite_difference"; the three compute the
same meta-gradient, so their accuracies agree while their step times differ. Prints a table of
held-out accuracy and mean step time, and saves a plot. Needs the `demo` extra (scikit-learn,
tqdm, matplotlib).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import kdops
from kdops import meta

TEMPERATURE, ALPHA = 4.0, 0.5


def load_digits(device):
    """(train, quiz, test) splits of the 1797 8×8 digits, standardized, as tensors."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.target), generator=g)
    x = torch.tensor(data.data, dtype=torch.float32)[order]
    y = torch.tensor(data.target, dtype=torch.long)[order]
    x = (x - x[:1000].mean(0)) / (x[:1000].std(0) + 1e-3)
    parts = ((0, 1000), (1000, 1300), (1300, len(y)))
    return [(x[a:b].to(device), y[a:b].to(device)) for a, b in parts]


def mlp(widths, seed):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batches(x, y, size, seed):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g).to(x.device)
    for i in range(0, len(y) - size + 1, size):
        idx = order[i:i + size]
        yield x[idx], y[idx]


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return acc


def train_teacher(train, epochs, device):
    teacher = mlp([64, 256, 256, 10], seed=1).to(device)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        for xb, yb in batches(*train, 64, seed=epoch):
            opt.zero_grad()
            F.cross_entropy(teacher(xb), yb).backward()
            opt.step()
    return teacher


def run_method(method, mode, teacher, train, quiz, epochs, device):
    """Trains a fresh student; returns (student, mean seconds per step)."""
    student = mlp([64, 24, 10], seed=2).to(device)
    teacher = _copy(teacher)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=1e-3)
    temperature = kdops.LearnableTemperature(TEMPERATURE).to(device)
    tau_opt = torch.optim.Adam(temperature.parameters(), lr=0.02)
    kd = dict(alpha=ALPHA)
    seconds, steps = 0.0, 0
    for epoch in range(epochs):
        quiz_batches = batches(*quiz, 64, seed=100 + epoch)
        for xb, yb in batches(*train, 64, seed=epoch):
            try:
                xq, yq = next(quiz_batches)
            except StopIteration:
                quiz_batches = batches(*quiz, 64, seed=200 + epoch)
                xq, yq = next(quiz_batches)
            _sync(device)
            start = time.perf_counter()
            if method == "CE only":
                s_opt.zero_grad()
                F.cross_entropy(student(xb), yb).backward()
                s_opt.step()
            elif method == "KD":
                with torch.no_grad():
                    t = teacher(xb)
                s_opt.zero_grad()
                kdops.fused_kd_loss(student(xb), t, temperature=TEMPERATURE, labels=yb,
                                    **kd).backward()
                s_opt.step()
            elif method == "MetaDistil":
                meta.metadistil_step(student, teacher, s_opt, t_opt, xb, yb, xq, yq, mode=mode,
                                     temperature=TEMPERATURE, **kd)
            else:
                meta.mkd_step(student, teacher, temperature, s_opt, tau_opt, xb, yb, xq, yq,
                              mode=mode, **kd)
            _sync(device)
            seconds += time.perf_counter() - start
            steps += 1
    return student, seconds / max(steps, 1)


def _copy(module):
    import copy
    return copy.deepcopy(module)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


RUNS = [("CE only", "-"), ("KD", "-"),
        *(("MetaDistil", m) for m in meta.MODES), *(("MKD", m) for m in meta.MODES)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kdops.demo", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="student epochs per method")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--out", default="kdops_demo.png", help="where to save the plot")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    device = torch.device(args.device)
    train, quiz, test = load_digits(device)
    teacher = train_teacher(train, args.teacher_epochs, device)
    rows = [("teacher", "-", accuracy(teacher, *test), float("nan"))]
    for method, mode in tqdm(RUNS, desc="training students", unit="run"):
        student, step = run_method(method, mode, teacher, train, quiz, args.epochs, device)
        rows.append((method, mode, accuracy(student, *test), step))
    print(f"\n{'method':12s} {'meta-gradient':18s} {'test accuracy':>13s} {'ms / step':>10s}")
    for method, mode, acc, step in rows:
        print(f"{method:12s} {mode:18s} {acc:13.4f} {step * 1e3:10.2f}")
    _plot(rows[1:], args.out)
    print(f"\nplot saved to {args.out} ({device.type}, kdops {kdops.__version__})")
    return rows


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m if mode == "-" else f"{m}\n{mode.replace('finite_difference', 'fin. diff.')}"
              for m, mode, _, _ in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.bar(labels, [acc for _, _, acc, _ in rows], color="tab:blue")
    left.set_ylim(min(acc for _, _, acc, _ in rows) - 0.05, 1.0)
    left.set_ylabel("held-out accuracy (digits)")
    right.bar(labels, [step * 1e3 for _, _, _, step in rows], color="tab:orange")
    right.set_ylabel("ms per training step")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
