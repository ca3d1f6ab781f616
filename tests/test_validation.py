"""Bad arguments raise TypeError/ValueError naming the argument."""
import math

import pytest
import torch

import kdops
from cases import logits

S, T = logits(4, 6), logits(4, 6, seed=1)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(student_logits=logits(4, 7)), ValueError, "same shape"),
    (dict(student_logits=torch.ones(4, 6, dtype=torch.int64)), TypeError, "student_logits.*floating"),
    (dict(teacher_logits=torch.ones(4, 6, dtype=torch.int32)), TypeError, "teacher_logits.*floating"),
    (dict(student_logits=[[1.0]]), TypeError, "student_logits must be a torch.Tensor"),
    (dict(student_logits=torch.empty(4, 0), teacher_logits=torch.empty(4, 0)), ValueError, "V >= 1"),
    (dict(student_logits=logits(4, 6, dtype=torch.float16).to("meta")), ValueError, "same device"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(temperature="2"), TypeError, "temperature must be a float or a tensor"),
    (dict(temperature=torch.tensor([1.0, 2.0, -1.0, 1.0])), ValueError, "temperature must be finite"),
    (dict(temperature=torch.tensor(float("inf"))), ValueError, "temperature must be finite"),
    (dict(temperature=torch.tensor(2)), TypeError, "temperature must be a floating-point tensor"),
    (dict(temperature=torch.ones(3)), ValueError, "temperature of shape \\(3,\\) does not broadcast"),
    (dict(teacher_temperature=0.0), ValueError, "teacher_temperature"),
    (dict(teacher_temperature=torch.zeros(())), ValueError, "teacher_temperature"),
    (dict(divergence="kld"), ValueError, "divergence must be one of"),
    (dict(divergence="jsd", beta=1.5), ValueError, "beta must lie in \\[0, 1\\]"),
    (dict(divergence="jsd", beta=-0.1), ValueError, "beta"),
    (dict(beta=True), TypeError, "beta must be a float"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(alpha=0.5), ValueError, "pass labels"),
    (dict(alpha=1.5, labels=torch.zeros(4, dtype=torch.long)), ValueError, "alpha must lie"),
    (dict(labels=torch.zeros(4)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels must have the logits' leading shape"),
    (dict(labels=torch.tensor([0, 1, 6, 2])), ValueError, "labels must lie in \\[0, 6\\)"),
    (dict(labels=torch.tensor([0, -1, 2, 2])), ValueError, "ignore_index=-100"),
    (dict(scale=math.nan), ValueError, "scale must be finite"),
    (dict(scale=torch.ones(2, 2)), ValueError, "scale of shape"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(student_logits=S, teacher_logits=T)
    args.update(kwargs)
    s, t = args.pop("student_logits"), args.pop("teacher_logits")
    with pytest.raises(error, match=match):
        kdops.fused_kd_loss(s, t, **args)


def test_module_checks_options_at_construction():
    with pytest.raises(ValueError, match="divergence"):
        kdops.KDLoss(divergence="mse")
    with pytest.raises(ValueError, match="reduction"):
        kdops.KDLoss(reduction="avg")


def test_custom_ignore_index_accepted():
    labels = torch.tensor([0, 7, 2, 7])
    loss = kdops.fused_kd_loss(S, T, labels=labels, ignore_index=7, reduction="none")
    assert loss[1] == 0 and loss[3] == 0 and (loss[[0, 2]] > 0).all()
