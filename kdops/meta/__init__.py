"""Meta-learned distillation: meta-gradients through a pilot step, MetaDistil and MKD steps.

MetaDistil (Zhou et al., 2022) trains the teacher to teach: a *pilot* copy of the student takes
one SGD step on the distillation loss L_p(θ, w) = α·c·D(s(θ), t(w)) + (1 − α)·CE(s(θ), y), the
pilot is scored on a quiz batch, L_q(θ'), and the teacher w follows ∇w L_q(θ'(w)). Then the
real student steps with the updated teacher.

`meta_gradient` computes ∇w L_q(θ'(w)) (and the gradient to learnable temperatures, MKD's
meta-parameters) in one of three ways:

``"jvp"`` (default; DESIGN.md §4): with u = ∇θ' L_q(θ') and z = J_s(θ)·u (one forward-mode JVP
    through the student), ∇w L_q = −lr·K · J_t(w)ᵀ ∂/∂t ⟨∂L_p/∂s, z⟩: the fused second-order
    loss kernel on the logits, then one backward through the teacher. No create_graph through
    any network. Exact for one pilot step of SGD, with weight decay and momentum (K is the
    momentum's factor on the gradient: 1, 1 − dampening, or 1 + m·(1 − dampening) for
    Nesterov; the buffers do not depend on w). z comes from the pilot's own forward of the
    student: only the tangent terms run (two convolutions per convolution, say), not the
    forward again. The first such forward of a student is recorded by a
    `tangent.TangentTape`, as a fallback: where `graph_tangent.graph_jvp` covers every node
    of its autograd graph (convolutional, MLP, recurrent and sequence students), the tangents
    are read off that graph and the later forwards run unobserved, so the record's cost (tens
    of microseconds per operator) goes. Where neither can replay a forward exactly (an
    in-place or random operator without a rule, a compiled region) a warning says why and
    torch.func.jvp runs a second forward instead. Attention through
    F.scaled_dot_product_attention replays without dropout, or with the dropout of the math
    kernel (whose masks the graph and the record keep); a fused kernel's attention dropout
    cannot be replayed, and torch.func.jvp has no rule for those kernels: use "autograd" or
    "finite_difference" there. The same holds for cuDNN's RNNs with dropout between layers
    (their masks stay inside the kernel) and over packed sequences; without, they are read
    (`recurrent`). Where torch.func.jvp fails too, NotImplementedError says so.
``"autograd"``: create_graph through the student's backward, the fused loss and the fused pilot
    step: the exact reference, at the cost of a second-order graph of the student.
``"finite_difference"``: z ≈ (s(θ + εu) − s(θ − εu)) / 2ε with ε = `fd_eps`/‖u‖ (DistPro's
    trick), for students without forward-mode AD; exact to O(ε²).

`metadistil_step` learns the teacher this way; `mkd_step` learns the temperature
(`kdops.LearnableTemperature`: log-space or CTKD's 1 + 20·sigmoid, one value or one per
sample) with the teacher fixed (MKD, Liu et al., 2022).

Only one pilot step is supported: with several pilot batches the meta-gradient involves the
student's Hessian between steps, which neither "jvp" nor "finite_difference" computes.

Train-mode subtleties: dropout draws the same masks in every forward of the student at θ (the
RNG state is replayed), and BatchNorm uses batch statistics in the JVP, finite-difference and
quiz forwards without touching the running statistics, which the pilot forward updates once.

CUDA graphs: a "jvp" `metadistil_step` or `mkd_step` whose student's graph is readable issues
no host sync and can be captured in a CUDA graph after a few eager steps, as a whole training
step is: `CapturedStep` does it (static shapes, new batches copied into the captured tensors,
a new capture where a scheduler changed a learning rate). Optimizers that keep step counts need
`capturable=True` (Adam's, say). A step that needs a second student forward with the pilot's
dropout masks (`recompute_student`, "finite_difference", the torch.func.jvp fallback) raises
during capture.
"""
from .captured import CapturedStep
from .gradient import MODES, meta_gradient
from .steps import metadistil_step, mkd_step, sgd_settings
from .train_mode import PhaseTimer, frozen_batch_norm_stats

__all__ = ["CapturedStep", "MODES", "meta_gradient", "metadistil_step", "mkd_step",
           "sgd_settings", "PhaseTimer", "frozen_batch_norm_stats"]
