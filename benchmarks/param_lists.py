"""Real parameter lists for the pilot-step benchmarks, built from random-initialized models.

    resnet_cifar(depth)   He et al.'s CIFAR ResNet (depth 6n + 2: 20, 56, ...), the students and
                          teachers of MetaDistil's and RepDistiller's CV experiments
    bert_base_shapes()    the parameter shapes of BERT-base (110M parameters in 199 tensors),
                          MetaDistil's NLP teacher, as random tensors (no model code needed)
"""
import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs: widths 16, 32, 64, global pooling, a linear head."""

    def __init__(self, depth=20, num_classes=100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_Block(cin, width, stride if i == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.layers(torch.relu(self.bn(self.conv(x))))
        return self.fc(out.mean((2, 3)))


def resnet_cifar(depth=20, num_classes=100, seed=0):
    torch.manual_seed(seed)
    return ResNetCifar(depth, num_classes)


def bert_base_shapes(vocab=30522, hidden=768, layers=12, intermediate=3072, positions=512):
    """The shapes of BERT-base's parameters, in its named_parameters() order."""
    shapes = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _ in range(4):                                     # query, key, value, output
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]                       # attention LayerNorm
        shapes += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,)]
        shapes += [(hidden,), (hidden,)]                       # output LayerNorm
    return shapes + [(hidden, hidden), (hidden,)]              # pooler


def param_list(name, seed=0):
    """(params, grads) of a named list: 'resnet20', 'bert_base', or 'tiny' (for smoke tests)."""
    g = torch.Generator().manual_seed(seed)
    if name == "resnet20":
        params = [p.detach().clone() for p in resnet_cifar(20).parameters()]
    elif name == "bert_base":
        params = [torch.randn(s, generator=g) * 0.02 for s in bert_base_shapes()]
    elif name == "tiny":
        params = [torch.randn(s, generator=g) for s in ((5, 3), (7,), (2, 3, 3, 3))]
    else:
        raise ValueError(f"unknown parameter list {name!r}")
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    return params, grads
