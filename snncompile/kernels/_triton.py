"""The Triton kernels behind :mod:`snncompile.kernels.lif` (imported lazily from there: importing
snncompile never imports Triton). Each one runs the LIF recurrence over T in registers for a block of
neurons; see lif.py for what they compute and why."""

import triton
import triton.language as tl


@triton.jit
def lif_step(u, o, current, k_tau1, v_th):
    """One step of the LIF recurrence in fp32: (u[t], o[t]) from (u[t-1], o[t-1]) and I[t]. Every kernel's
    forward recurrence, the backward kernels' recompute included, is this one, so that a recomputed
    membrane has the forward's bits."""
    u = k_tau1 * u * (1.0 - o) + current
    return u, (u > v_th).to(tl.float32)


@triton.jit
def read_current(ptrs, mask, bias, HAS_BIAS: tl.constexpr):
    """The currents at ``ptrs`` in fp32, plus the per-channel ``bias`` when there is one: what every forward
    recurrence reads, the backward kernels' recompute included."""
    cur = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        cur = cur + bias
    return cur


@triton.jit
def channel_bias(b_ptr, channel, mask, HAS_BIAS: tl.constexpr):
    """The conv/linear's bias of each neuron's ``channel`` (any shape) in fp32, or 0.0 without a bias, which
    read_current then does not add."""
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + channel, mask=mask, other=0.0).to(tl.float32)
    return bias


@triton.jit
def recompute_membranes(ptrs, step_stride, mask, bias, rows, history, k_tau1, v_th, T: tl.constexpr,
                        HAS_BIAS: tl.constexpr):
    """The backward kernels' recompute: the forward recurrence again over the currents at ``ptrs + t *
    step_stride`` (read_current and lif_step, so the forward's bits), membrane t put into row t of ``history``
    ``[T_POW2, *ptrs.shape]`` (``rows``: its row index, broadcastable) with a where; returns ``history``."""
    u = tl.zeros(ptrs.shape, dtype=tl.float32)
    o = tl.zeros(ptrs.shape, dtype=tl.float32)
    for t in tl.static_range(T):
        cur = read_current(ptrs + t * step_stride, mask, bias, HAS_BIAS)
        u, o = lif_step(u, o, cur, k_tau1, v_th)
        history = tl.where(rows == t, tl.expand_dims(u, 0), history)
    return history


@triton.jit
def lif_forward(i_ptr, o_ptr, u_ptr, b_ptr, n, chan_div, channels, k_tau1, v_th, T: tl.constexpr,
                SAVE_U: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # the conv/linear's bias, per channel: channel (i // chan_div) % channels of step index i
    bias = channel_bias(b_ptr, (offs // chan_div) % channels, mask, HAS_BIAS)
    u = tl.zeros((BLOCK,), dtype=tl.float32)
    o = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in tl.static_range(T):
        cur = read_current(i_ptr + t * n + offs, mask, bias, HAS_BIAS)
        u, o = lif_step(u, o, cur, k_tau1, v_th)
        tl.store(o_ptr + t * n + offs, o, mask=mask)
        if SAVE_U:
            tl.store(u_ptr + t * n + offs, u, mask=mask)


@triton.jit
def store_gradient(ptrs, g, mask, GRAD_BF16: tl.constexpr):
    """Store the fp32 gradient ``g``; with GRAD_BF16 into a bf16 buffer (passed as int16): the top half of
    the fp32 bits rounded to nearest even by integer arithmetic, which is what torch's cast does (a bf16
    store's own rounding is the backend's: Triton's interpreter truncates). A NaN becomes bf16's quiet NaN,
    as in torch's cast: rounding its bits would carry a NaN such as 0x7FFFFFFF (NVIDIA's canonical one)
    into the sign bit, a zero gradient."""
    if GRAD_BF16:
        bits = g.to(tl.uint32, bitcast=True)
        bits = tl.where(g != g, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
        tl.store(ptrs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, g, mask=mask)


@triton.jit
def lif_backward(u_ptr, go_ptr, gi_ptr, gb_ptr, b_ptr, n, chan_div, channels, k_tau1, v_th, half_a, inv_a,
                 T: tl.constexpr, T_POW2: tl.constexpr, GRAD_BF16: tl.constexpr, SUM_T: tl.constexpr,
                 RECOMPUTE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # SUM_T: also each neuron's gradient summed over T, in fp32, into gb_ptr [n] (the bias gradient's first
    # reduction, from registers: a separate sum would read the whole [T, ...] gradient again).
    # RECOMPUTE: u_ptr holds the currents (16-bit, what autograd kept), not the membrane: the forward
    # recurrence runs here first (lif_forward's arithmetic, bias included: the same bits) and keeps the T
    # membranes in registers, a [T_POW2, BLOCK] tile whose rows the reverse loop reads back. Row t is put
    # with a where over rows == t and taken with a sum of it and -0.0s (x + -0.0 = x for every x, -0.0
    # included), which the compiler resolves to register moves once the loops are unrolled. The fp32
    # membrane is never written: backward reads 2 bytes of currents per neuron-step where the recompute
    # kernel read them, wrote the membrane (4) and the backward kernel read it back (4).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if RECOMPUTE:
        rows = tl.arange(0, T_POW2)[:, None]
        history = tl.zeros((T_POW2, BLOCK), dtype=tl.float32)
        bias = channel_bias(b_ptr, (offs // chan_div) % channels, mask, HAS_BIAS)
        history = recompute_membranes(u_ptr + offs, n, mask, bias, rows, history, k_tau1, v_th, T, HAS_BIAS)
    g_next = tl.zeros((BLOCK,), dtype=tl.float32)
    g_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(T):
        t = T - 1 - s
        if RECOMPUTE:
            u = tl.sum(tl.where(rows == t, history, -0.0), axis=0)  # row t plus -0.0s: exactly row t
        else:
            u = tl.load(u_ptr + t * n + offs, mask=mask, other=0.0)
        g_o = tl.load(go_ptr + t * n + offs, mask=mask, other=0.0).to(tl.float32)
        o = (u > v_th).to(tl.float32)
        sg = (tl.abs(u - v_th) < half_a).to(tl.float32) * inv_a
        g_o = g_o - k_tau1 * u * g_next
        g_u = g_o * sg + k_tau1 * (1.0 - o) * g_next
        store_gradient(gi_ptr + t * n + offs, g_u, mask, GRAD_BF16)
        g_next = g_u
        if SUM_T:
            g_sum = g_sum + g_u
    if SUM_T:
        tl.store(gb_ptr + offs, g_sum, mask=mask)


@triton.jit
def output_coordinates(n_out, channels, height_out, width_out, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK outputs of ``[N, C, H, W]``: (mask, n, c, h, w), each ``[BLOCK]``, in the order
    the output is laid out (c fastest in channels_last, w in NCHW), so that neighbouring lanes are
    neighbours in memory."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if CHANNELS_LAST:
        c = idx % channels
        w = (idx // channels) % width_out
        h = (idx // (channels * width_out)) % height_out
    else:
        w = idx % width_out
        h = (idx // width_out) % height_out
        c = (idx // (width_out * height_out)) % channels
    return idx < n_out, idx // (width_out * height_out * channels), c, h, w


@triton.jit
def pool_windows(n_out, channels, height_out, width_out, s_n, s_c, s_h, s_w, o_s_n, o_s_c, o_s_h, o_s_w,
                 K: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK pooled outputs (n, c, ho, wo): their mask, the element offsets of their
    K*K input neurons ``[BLOCK, K*K]``, their own offsets ``[BLOCK]``, in step 0, and their channels. Neighbouring outputs
    are neighbours in memory: wo varies fastest in NCHW, c in channels_last, so that a warp's loads of one
    window position fall in a few whole sectors (with wo fastest in channels_last, each thread's 4 bytes
    would cost a 32-byte sector of its own)."""
    mask, n, c, ho, wo = output_coordinates(n_out, channels, height_out, width_out, CHANNELS_LAST, BLOCK)
    win = tl.arange(0, K * K)
    src = (n[:, None] * s_n + c[:, None] * s_c + (ho[:, None] * K + (win // K)[None, :]) * s_h
           + (wo[:, None] * K + (win % K)[None, :]) * s_w)
    return mask, src, n * o_s_n + c * o_s_c + ho * o_s_h + wo * o_s_w, c


@triton.jit
def lif_pool_forward(i_ptr, o_ptr, u_ptr, b_ptr, n_out, channels, height_out, width_out, s_t, s_n, s_c, s_h,
                     s_w, o_s_t, o_s_n, o_s_c, o_s_h, o_s_w, k_tau1, v_th, T: tl.constexpr, K: tl.constexpr,
                     SAVE_U: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # one program: BLOCK pooled outputs x their K*K input neurons, all T steps in registers
    mask, src, dst, c = pool_windows(n_out, channels, height_out, width_out, s_n, s_c, s_h, s_w,
                                     o_s_n, o_s_c, o_s_h, o_s_w, K, CHANNELS_LAST, BLOCK)
    bias = channel_bias(b_ptr, c[:, None], mask[:, None], HAS_BIAS)  # a window is one channel's: [BLOCK, 1]
    u = tl.zeros((BLOCK, K * K), dtype=tl.float32)
    o = tl.zeros((BLOCK, K * K), dtype=tl.float32)
    for t in tl.static_range(T):
        cur = read_current(i_ptr + t * s_t + src, mask[:, None], bias, HAS_BIAS)
        u, o = lif_step(u, o, cur, k_tau1, v_th)
        if SAVE_U:
            tl.store(u_ptr + t * s_t + src, u, mask=mask[:, None])
        # a sum of 0/1 spikes is exact in any order, and 1/K^2 is a power of two: exactly avg_pool2d's value
        pooled = tl.sum(o, axis=1) * (1.0 / (K * K))
        tl.store(o_ptr + t * o_s_t + dst, pooled, mask=mask)


@triton.jit
def lif_pool_backward(u_ptr, gp_ptr, gi_ptr, gb_ptr, b_ptr, n_out, channels, height_out, width_out, s_t, s_n, s_c,
                      s_h, s_w, g_s_t, g_s_n, g_s_c, g_s_h, g_s_w, k_tau1, v_th, half_a, inv_a, T: tl.constexpr,
                      T_POW2: tl.constexpr, K: tl.constexpr, GRAD_BF16: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                      SUM_T: tl.constexpr, RECOMPUTE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # lif_backward's recurrence, with g_o[t] of each window neuron = g_pooled[t] / K^2 (avg_pool2d's backward);
    # SUM_T: the window's gradients summed over T and the window into gb_ptr at the pooled output's index in
    # this kernel's order (pool_windows: c fastest in channels_last, wo fastest in NCHW). RECOMPUTE: as in
    # lif_backward, the membrane recomputed from the currents at u_ptr (lif_pool_forward's arithmetic) and
    # kept in registers, a [T_POW2, BLOCK, K*K] tile.
    mask, src, dst, c = pool_windows(n_out, channels, height_out, width_out, s_n, s_c, s_h, s_w,
                                     g_s_n, g_s_c, g_s_h, g_s_w, K, CHANNELS_LAST, BLOCK)
    if RECOMPUTE:
        rows = tl.arange(0, T_POW2)[:, None, None]
        history = tl.zeros((T_POW2, BLOCK, K * K), dtype=tl.float32)
        bias = channel_bias(b_ptr, c[:, None], mask[:, None], HAS_BIAS)  # a window is one channel's
        history = recompute_membranes(u_ptr + src, s_t, mask[:, None], bias, rows, history, k_tau1, v_th, T,
                                      HAS_BIAS)
    g_next = tl.zeros((BLOCK, K * K), dtype=tl.float32)
    g_sum = tl.zeros((BLOCK, K * K), dtype=tl.float32)
    for s in tl.static_range(T):
        t = T - 1 - s
        if RECOMPUTE:
            u = tl.sum(tl.where(rows == t, history, -0.0), axis=0)  # row t plus -0.0s: exactly row t
        else:
            u = tl.load(u_ptr + t * s_t + src, mask=mask[:, None], other=0.0)
        g_pooled = tl.load(gp_ptr + t * g_s_t + dst, mask=mask, other=0.0).to(tl.float32)
        o = (u > v_th).to(tl.float32)
        sg = (tl.abs(u - v_th) < half_a).to(tl.float32) * inv_a
        g_o = (g_pooled * (1.0 / (K * K)))[:, None] - k_tau1 * u * g_next
        g_u = g_o * sg + k_tau1 * (1.0 - o) * g_next
        store_gradient(gi_ptr + t * s_t + src, g_u, mask[:, None], GRAD_BF16)
        g_next = g_u
        if SUM_T:
            g_sum = g_sum + g_u
    if SUM_T:
        tl.store(gb_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), tl.sum(g_sum, axis=1), mask=mask)


@triton.jit
def conv_lif_forward(x_ptr, w_ptr, b_ptr, o_ptr, u_ptr, channels, height_out, width_out, height_in, width_in,
                     x_s_t, x_s_n, x_s_c, x_s_h, x_s_w, u_s_t, u_s_n, u_s_c, u_s_h, u_s_w,
                     o_s_t, o_s_n, o_s_c, o_s_h, o_s_w, k_tau1, v_th, T: tl.constexpr, K: tl.constexpr,
                     C_IN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PAD_H: tl.constexpr,
                     PAD_W: tl.constexpr, SAVE_U: tl.constexpr, STORE_O: tl.constexpr, HAS_BIAS: tl.constexpr,
                     C_BLOCK: tl.constexpr, P_BLOCK: tl.constexpr):
    # one program: image n, C_BLOCK output channels x P_BLOCK outputs (ho, wo), each pooled over K x K conv
    # outputs (K = 1: none), as a [C_BLOCK, P_BLOCK, K*K] tile. Each conv output is summed directly from the
    # input, term by term in (ci, kh, kw) order from 0, then the bias, then the LIF over T in registers; the
    # conv's output, the largest tensor of an input layer, is never written. A tap's input values [P, K*K]
    # are loaded once for all C_BLOCK channels, and its weights [C_BLOCK] once for all positions: loads are
    # a small part of the instructions, the products and sums the rest. STORE_O off (K = 1, SAVE_U): the
    # membrane alone, which training's backward recomputes. Strides carry the layout (NCHW or channels_last).
    n = tl.program_id(0)
    c = tl.program_id(1) * C_BLOCK + tl.arange(0, C_BLOCK)
    p = tl.program_id(2) * P_BLOCK + tl.arange(0, P_BLOCK)
    c_ok = c < channels
    p_ok = p < height_out * width_out
    ho, wo = p // width_out, p % width_out
    win = tl.arange(0, K * K)
    h = ho[:, None] * K + (win // K)[None, :]  # [P_BLOCK, K*K] conv output rows and columns
    w = wo[:, None] * K + (win % K)[None, :]
    inside = p_ok[:, None] & (win >= 0)[None, :]
    x_base = x_ptr + n * x_s_n
    w_base = w_ptr + c * (C_IN * KH * KW)
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None, None]
    keep = c_ok[:, None, None] & inside[None, :, :]
    u_off = n * u_s_n + c[:, None, None] * u_s_c + (h * u_s_h + w * u_s_w)[None, :, :]
    o_off = n * o_s_n + c[:, None] * o_s_c + (ho * o_s_h + wo * o_s_w)[None, :]
    u = tl.zeros((C_BLOCK, P_BLOCK, K * K), dtype=tl.float32)
    o = tl.zeros((C_BLOCK, P_BLOCK, K * K), dtype=tl.float32)
    for t in range(T):  # not unrolled: the taps already are (18-27 of them), and T copies took 5x the compile time
        acc = tl.zeros((C_BLOCK, P_BLOCK, K * K), dtype=tl.float32)
        for ci in tl.static_range(C_IN):
            for kh in tl.static_range(KH):
                ih = h + (kh - PAD_H)
                for kw in tl.static_range(KW):
                    iw = w + (kw - PAD_W)
                    ok = inside & (ih >= 0) & (ih < height_in) & (iw >= 0) & (iw < width_in)
                    xv = tl.load(x_base + t * x_s_t + ci * x_s_c + ih * x_s_h + iw * x_s_w, mask=ok,
                                 other=0.0).to(tl.float32)
                    wv = tl.load(w_base + ((ci * KH + kh) * KW + kw), mask=c_ok, other=0.0).to(tl.float32)
                    acc = acc + wv[:, None, None] * xv[None, :, :]
        if HAS_BIAS:
            acc = acc + bias
        u, o = lif_step(u, o, acc, k_tau1, v_th)
        if SAVE_U:
            tl.store(u_ptr + t * u_s_t + u_off, u, mask=keep)
        if STORE_O:
            # a sum of 0/1 spikes is exact in any order, and 1/K^2 is a power of two: exactly avg_pool2d's value
            pooled = tl.sum(o, axis=2) * (1.0 / (K * K))
            tl.store(o_ptr + t * o_s_t + o_off, pooled, mask=c_ok[:, None] & p_ok[None, :])


@triton.jit
def neunorm_tile(f_block, p_block, channels, positions, width, s_f, s_h, s_w, F_BLOCK: tl.constexpr,
                 P_BLOCK: tl.constexpr):
    """NeuNorm's [F_BLOCK, P_BLOCK] tile of one (t, b) map: channels x positions (p = h * width + w), its
    memory offsets by the map's strides (NCHW or channels_last alike), its offsets into a dense [F, H*W]
    tensor (U), the positions and the mask."""
    f = f_block * F_BLOCK + tl.arange(0, F_BLOCK)
    p = p_block * P_BLOCK + tl.arange(0, P_BLOCK)
    mask = (f < channels)[:, None] & (p < positions)[None, :]
    offs = f[:, None] * s_f + ((p // width) * s_h + (p % width) * s_w)[None, :]
    return offs, f[:, None] * positions + p[None, :], p, mask


@triton.jit
def neunorm_forward(o_ptr, u_ptr, x_ptr, y_ptr, batch, channels, positions, width, s_t, s_b, s_f, s_h, s_w,
                    F_BLOCK: tl.constexpr, P_BLOCK: tl.constexpr):
    # y[t, b, f, p] = o - U[f, p] * x[t, b, p]: NeuNorm's output in one pass (torch's broadcast writes the
    # product U * x at full size and reads it back). x is [T*B, H*W], U [F, H*W], both dense; o and y share
    # o's strides. Program (t * batch + b, channel block, position block).
    tb = tl.program_id(0)
    base = (tb // batch) * s_t + (tb % batch) * s_b
    offs, u_offs, p, mask = neunorm_tile(tl.program_id(1), tl.program_id(2), channels, positions, width, s_f, s_h,
                                         s_w, F_BLOCK, P_BLOCK)
    x = tl.load(x_ptr + tb * positions + p, mask=p < positions, other=0.0)
    o = tl.load(o_ptr + base + offs, mask=mask, other=0.0)
    u = tl.load(u_ptr + u_offs, mask=mask, other=0.0)
    tl.store(y_ptr + base + offs, o - u * x[None, :], mask=mask)


@triton.jit
def neunorm_channel_dot(g_ptr, u_ptr, d_ptr, batch, channels, positions, width, s_t, s_b, s_f, s_h, s_w,
                        F_BLOCKS: tl.constexpr, F_BLOCK: tl.constexpr, P_BLOCK: tl.constexpr):
    # d[t, b, p] = sum over f of g[t, b, f, p] * U[f, p], in fp32, channel block by channel block (F_BLOCKS of
    # them; a loop, not unrolled): the gradient reaching x[t] from the output (negated by the caller).
    # Program (t * batch + b, position block).
    tb = tl.program_id(0)
    base = (tb // batch) * s_t + (tb % batch) * s_b
    acc = tl.zeros((P_BLOCK,), dtype=tl.float32)
    for f_block in range(F_BLOCKS):
        offs, u_offs, p, mask = neunorm_tile(f_block, tl.program_id(1), channels, positions, width, s_f, s_h, s_w,
                                             F_BLOCK, P_BLOCK)
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0)
        u = tl.load(u_ptr + u_offs, mask=mask, other=0.0)
        acc += tl.sum(g * u, axis=0)
    p = tl.program_id(1) * P_BLOCK + tl.arange(0, P_BLOCK)
    tl.store(d_ptr + tb * positions + p, acc, mask=p < positions)


@triton.jit
def neunorm_backward(g_ptr, x_ptr, gx_ptr, go_ptr, gu_ptr, v_over_f, batch, channels, positions, width, s_t, s_b,
                     s_f, s_h, s_w, T: tl.constexpr, U_GRAD: tl.constexpr, F_BLOCK: tl.constexpr,
                     P_BLOCK: tl.constexpr):
    # The spikes' gradient go = g + (v/F) * gx[t, b, p] (the output's own, plus the channel sum's through x:
    # gx is d loss / d x[t], the reverse recurrence the caller ran on [T, B, H*W]), and this image's share
    # of U's gradient, sum over t of g * x[t] (negated by the caller), into gu_ptr [B, F, H*W]: the caller
    # sums the B shares (U_GRAD: only when U's gradient is wanted). The loop over T is not unrolled (the code
    # would grow with T). Program (b, channel block, position block); g and go share g's strides.
    b = tl.program_id(0)
    offs, u_offs, p, mask = neunorm_tile(tl.program_id(1), tl.program_id(2), channels, positions, width, s_f, s_h,
                                         s_w, F_BLOCK, P_BLOCK)
    acc = tl.zeros((F_BLOCK, P_BLOCK), dtype=tl.float32)
    for t in range(T):
        base = t * s_t + b * s_b
        row = (t * batch + b) * positions + p
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0)
        gx = tl.load(gx_ptr + row, mask=p < positions, other=0.0)
        tl.store(go_ptr + base + offs, g + v_over_f * gx[None, :], mask=mask)
        if U_GRAD:
            x = tl.load(x_ptr + row, mask=p < positions, other=0.0)
            acc += g * x[None, :]
    if U_GRAD:
        tl.store(gu_ptr + b * channels * positions + u_offs, acc, mask=mask)
