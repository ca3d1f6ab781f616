"""Triton helpers shared by the loss kernels: tiles of rows, per-row state, row statistics.

Every kernel works on a tile of ROWS rows × BLOCK_V columns and loops over the vocabulary in
blocks of BLOCK_V, so one program covers several short rows (V = 100) or one long row in
pieces (V = 128256). Per-row state is a [ROWS] vector; offsets are 64-bit.
Math is in the compute dtype (float32, or float64 for float64 inputs), the dtype of the
temperatures; logits of any floating dtype are converted on load.

Float32 on the GPU: Triton compiles `/` to div.full, 2 ulp off, and an error of 2 ulp in
z = s/τ shifts every exp(z − max) by 2 ulp of z: 3× eager's error at 65536 × 100 (H100).
The kernels divide with `div`, IEEE-rounded as eager's s / T.
"""
import triton
import triton.language as tl


@triton.jit
def div(x, y):
    """x / y rounded to nearest, broadcast. In float32 one residual step (Markstein) corrects
    x·(1/y): e = x − q·y is exact by FMA and q + e·(1/y) is the rounded quotient but for
    near-halfway cases (off by 1 ulp), with no branch; a per-row y costs one reciprocal per
    row. Where the step gives NaN (x or y infinite, y = 0, a quotient that overflows) x·(1/y)
    stands. Float64 `/` is div.rn already."""
    if x.dtype == tl.float32:
        r = 1.0 / y
        q = x * r
        e = tl.fma(-q, tl.broadcast_to(y, q.shape), tl.broadcast_to(x, q.shape))
        refined = tl.fma(e, tl.broadcast_to(r, q.shape), q)
        return tl.where(refined == refined, refined, q)
    else:
        return x / y


@triton.jit
def log1p(x):
    """log(1 + x) to a few ulps from tl.log: the rounding error of u = 1 + x cancels in
    log(u)·x/(u − 1) (Kahan). libdevice has log1p, but the interpreter has no libdevice."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * div(x, u - 1.0))


@triton.jit
def expm1(x):
    """exp(x) − 1 to a few ulps from tl.exp: (u − 1)·x/log(u) with u = exp(x) (Kahan)."""
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * div(x, tl.log(u))))


@triton.jit
def row_tile(n, ROWS: tl.constexpr):
    """(row indices [ROWS] as int64, which of them exist) of this program's tile."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    return rows, rows < n


@triton.jit
def block_cols(start, v, BLOCK_V: tl.constexpr, BACKWARD: tl.constexpr):
    """Columns of the block of a pass over a row whose loop reached `start` (0, BLOCK_V, ...,
    below v): that block itself, or, BACKWARD, its mirror image from the row's end. A pass that
    follows another walks the row BACKWARD, so that it starts on the blocks the pass before
    read last: those are the likeliest to be still in L2 when a row (770 KB of s, t and v in
    bf16 at V = 128256) is too long to stay on chip."""
    first = start
    if BACKWARD:
        first = (v - 1) // BLOCK_V * BLOCK_V - start
    return first + tl.arange(0, BLOCK_V)


@triton.jit
def load_rows(ptr, stride, rows, row_ok):
    """One value per row of an [N]-shaped vector with any stride (0 for a broadcast scalar)."""
    return tl.load(ptr + rows * stride, mask=row_ok, other=1.0)


@triton.jit
def row_validity(labels_ptr, rows, row_ok, ignore_index, HAS_LABELS: tl.constexpr):
    """(valid rows, label index safe to read at) — every existing row is valid without labels."""
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
        valid = row_ok & (label != ignore_index)
        safe = tl.where(valid, label, 0)
    else:
        valid = row_ok
        safe = tl.zeros_like(rows)
    return valid, safe


@triton.jit
def load_z(ptr, stride, rows, cols, mask, tau):
    """A [ROWS, BLOCK_V] block of logits / τ in the compute dtype; −inf outside the row."""
    x = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=float("-inf"))
    return div(x.to(tau.dtype), tau[:, None])


@triton.jit
def online_lse(m, s, z):
    """Running (max, Σ exp(z − max)) of each row after one more block z.

    A row whose entries so far are all −inf keeps max −inf and sum 0 (shifted by 0, not −inf,
    so no inf − inf)."""
    m_new = tl.maximum(m, tl.max(z, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)


@triton.jit
def log_probs(z, m, logsum, LOWEST: tl.constexpr):
    """(log p clamped at the dtype's lowest finite value, p, shifted z with −inf as 0).

    p = exp((z − max) − log Σ exp(z − max)) as in kdops._loss_portable: exact where the
    logits are large, and an entry at −inf gets p = 0 and finite log-differences."""
    shifted = z - m[:, None]
    logp = shifted - logsum[:, None]
    logp = tl.where(logp == float("-inf"), LOWEST, logp)
    return logp, tl.exp(logp), tl.where(shifted == float("-inf"), 0.0, shifted)


@triton.jit
def block_log_probs(s_ptr, t_ptr, s_stride, t_stride, rows, row_ok, cols, v, tau_s, tau_t,
                    ms, mt, log_ss, log_st, LOWEST: tl.constexpr):
    """(mask, then `log_probs` of the student and of the teacher) for one vocabulary block
    `cols` of this tile, from the row statistics: what every pass after the first starts
    from."""
    mask = row_ok[:, None] & (cols < v)[None, :]
    ls, ps, zs = log_probs(load_z(s_ptr, s_stride, rows, cols, mask, tau_s), ms, log_ss, LOWEST)
    lt, pt, zt = log_probs(load_z(t_ptr, t_stride, rows, cols, mask, tau_t), mt, log_st, LOWEST)
    return mask, ls, ps, zs, lt, pt, zt


@triton.jit
def jsd_logs(ls, lt, beta):
    """(e_s, e_t) = (log ps − log m, log pt − log m), m = β pt + (1 − β) ps, from
    d = log pt − log ps: log m − log ps = log1p(β expm1(d)) for d ≤ 0 and
    d + log1p((1 − β) expm1(−d)) for d > 0, free of overflow and cancellation; both are
    y = −log1p(c expm1(−|d|)), c = β or 1 − β, so one expm1 and one log1p per entry."""
    d = lt - ls
    below = d <= 0
    y = -log1p(tl.where(below, beta, 1.0 - beta) * expm1(-tl.abs(d)))
    return tl.where(below, y, y - d), tl.where(below, y + d, y)


@triton.jit
def divergence_sums(s_ptr, t_ptr, s_stride, t_stride, rows, row_ok, v, tau_s, tau_t, ms, mt,
                    log_ss, log_st, beta, KIND: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_V: tl.constexpr, LOWEST: tl.constexpr, BACKWARD: tl.constexpr):
    """The row sums whose combination is the divergence, one pass over the row from its
    statistics (in the order of `block_cols`): (⟨ps, e_s⟩, ⟨pt, e_t⟩) for the JSD
    (`jsd_logs`); (0, ⟨pt, lt − ls⟩) for KL and (⟨ps, ls − lt⟩, 0) for reverse KL (KIND 0, 1,
    2 as in `launch`)."""
    sum_s = tl.zeros([ROWS], dtype=tau_s.dtype)
    sum_t = tl.zeros([ROWS], dtype=tau_s.dtype)
    for start in range(0, v, BLOCK_V):
        cols = block_cols(start, v, BLOCK_V, BACKWARD)
        mask, ls, ps, _, lt, pt, _ = block_log_probs(
            s_ptr, t_ptr, s_stride, t_stride, rows, row_ok, cols, v, tau_s, tau_t,
            ms, mt, log_ss, log_st, LOWEST)
        if KIND == 0:
            sum_t += tl.sum(pt * (lt - ls), 1)
        elif KIND == 1:
            sum_s += tl.sum(ps * (ls - lt), 1)
        else:
            e_s, e_t = jsd_logs(ls, lt, beta)
            sum_s += tl.sum(ps * e_s, 1)
            sum_t += tl.sum(pt * e_t, 1)
    return sum_s, sum_t


@triton.jit
def load_stats(stats_ptr, n, rows, row_ok):
    """The six [N] rows of the saved statistics (see kdops._loss_ops) for this tile."""
    ms = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    mt = tl.load(stats_ptr + n + rows, mask=row_ok, other=0.0)
    ls = tl.load(stats_ptr + 2 * n + rows, mask=row_ok, other=0.0)
    lt = tl.load(stats_ptr + 3 * n + rows, mask=row_ok, other=0.0)
    m1 = tl.load(stats_ptr + 4 * n + rows, mask=row_ok, other=0.0)
    l1 = tl.load(stats_ptr + 5 * n + rows, mask=row_ok, other=0.0)
    return ms, mt, ls, lt, m1, l1


@triton.jit
def hard_probs(s_ptr, s_stride, rows, cols, mask, m1, l1):
    """softmax(s) at T = 1 for a block, from the saved max and log Σ exp (cross-entropy)."""
    s = tl.load(s_ptr + rows[:, None] * s_stride + cols[None, :], mask=mask, other=float("-inf"))
    return tl.exp((s.to(m1.dtype) - m1[:, None]) - l1[:, None])


@triton.jit
def store_rounded(ptr, x, mask):
    """Store x in ptr's dtype, rounding to nearest even also for bfloat16.

    GPUs round when they convert to bfloat16; Triton's interpreter truncates. Rounding the
    bits here (add 0x7FFF plus the lowest kept bit, then drop the low half) gives the
    same result on both, so the interpreted tests check what a GPU computes."""
    if ptr.dtype.element_ty == tl.bfloat16:
        f = x.to(tl.float32)
        bits = f.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(ptr, tl.where(f != f, f.to(tl.bfloat16), y), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)
