"""Triton kernels for the element-wise parts of SwiGLU and RoPE attention, used on CUDA (arch `fused_kernels`).

Measured on one H200 at the paper Sudoku shape (74,496 tokens, hidden 512, SwiGLU width 1536, 8 heads x 64),
torch.compile default mode, bf16 (docs/performance.md, "Fused SwiGLU and RoPE kernels"):
- `swiglu`: an autograd.Function whose forward kernel writes h = silu(gate) * up from the gate/up projection and
  whose backward kernel reads grad_h and gate_up once and writes grad_gate_up and the recomputed h (for the down
  projection's weight gradient) in one pass; h is not kept between forward and backward, so memory is that of the
  compiled plain path. Block forward+backward 2.192 ms against 2.334 (-142 us per call that runs backward; the
  element-wise backward alone 343.7 us against Inductor's 531.3), forward alone the same (0.737 / 0.735 ms);
  outputs bitwise equal to the compiled plain path, input gradients within 1 bf16 ulp (99.97% bitwise equal).
- `rope_qkv`: forward reads the qkv projection [B, S, h, hd] and writes the rotated q, k and v as contiguous
  [B, h, S, hd] (what SDPA takes); backward is one kernel from dq, dk, dv (any strides) to d(qkv). Attention
  forward+backward 1.584 ms against 1.677 (-93 us), but the forward alone 0.532 against 0.444 (+88 us): so the
  layers use it only where autograd records (the gradient cycle of a train step, 14 of its 42 layer calls at
  the paper Sudoku recipe), never in the no-grad cycles or evaluation.

Each kernel does its maths in fp32 registers and rounds once to the input dtype; `_torch_*` below are the same
maths in PyTorch, run where the kernels cannot (CPU, no Triton) and used by the tests as their reference. Triton
is imported only where it can run: with a CUDA device, or with TRITON_INTERPRET=1 (the interpreter, CPU tests).
"""

import os
from typing import Tuple

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
triton = None
if torch.cuda.is_available() or INTERPRET:
    try:
        import triton
        import triton.language as tl
    except ImportError:  # CUDA torch without Triton: the plain layers
        triton = None
HAVE_TRITON = triton is not None


def fused_applies(x: torch.Tensor) -> bool:
    """Whether the layers take the kernels for `x`: a CUDA tensor and Triton importable."""
    return HAVE_TRITON and x.is_cuda


def fused_rope_applies(x: torch.Tensor) -> bool:
    """The RoPE kernels pay only where a backward follows: autograd records and `x` needs a gradient."""
    return fused_applies(x) and torch.is_grad_enabled() and x.requires_grad


def _kernels_run_on(x: torch.Tensor) -> bool:
    return HAVE_TRITON and (x.is_cuda or INTERPRET)


# --------------------------------------------------------------------------------------------------------------
# The maths in PyTorch (fp32, rounded once to the input dtype): the kernels' reference and CPU fallback
# --------------------------------------------------------------------------------------------------------------
def _torch_swiglu_fwd(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.float().chunk(2, -1)  # gu: [M, 2N] -> h [M, N]
    return (g * torch.sigmoid(g) * u).to(gu.dtype)


def _torch_swiglu_bwd(grad_h: torch.Tensor, gu: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_gu [M, 2N], h [M, N]); d silu(g)/dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))."""
    g, u = gu.float().chunk(2, -1)
    gh = grad_h.float()
    sg = torch.sigmoid(g)
    silu = g * sg
    dgu = torch.cat((gh * u * (sg * (1.0 + g * (1.0 - sg))), gh * silu), -1)
    return dgu.to(gu.dtype), (silu * u).to(gu.dtype)


def _halves(cos: torch.Tensor, sin: torch.Tensor, S: int):
    c, s = cos[:S].float().unsqueeze(-2), sin[:S].float().unsqueeze(-2)  # [S, 1, hd]
    half = c.shape[-1] // 2
    return c[..., :half], c[..., half:], s[..., :half], s[..., half:]


def _torch_rope_fwd(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int):
    """qkv [B, S, nh+2nkv, hd] -> q [B, nh, S, hd], k, v [B, nkv, S, hd], contiguous; q and k rotated:
    [x1, x2] * cos + [-x2, x1] * sin (the halves layout of models/layers.rotate_half)."""
    S, hd = qkv.shape[1], qkv.shape[-1]
    c1, c2, s1, s2 = _halves(cos, sin, S)
    x = qkv[:, :, : nh + nkv].float()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    rot = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), -1).to(qkv.dtype)
    q, k, v = rot[:, :, :nh], rot[:, :, nh:], qkv[:, :, nh + nkv :]
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


def _torch_rope_bwd(dq, dk, dv, cos, sin, nh: int, nkv: int) -> torch.Tensor:
    """The transpose of the rotation: dq [B, nh, S, hd], dk, dv [B, nkv, S, hd] -> d(qkv) [B, S, nh+2nkv, hd]."""
    S, hd = dq.shape[2], dq.shape[-1]
    c1, c2, s1, s2 = _halves(cos, sin, S)
    parts = []
    for grad in (dq, dk):
        grad = grad.transpose(1, 2).float()
        g1, g2 = grad[..., : hd // 2], grad[..., hd // 2 :]
        parts.append(torch.cat((g1 * c1 + g2 * s2, g2 * c2 - g1 * s1), -1).to(dq.dtype))
    parts.append(dv.transpose(1, 2))
    return torch.cat(parts, 2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Triton kernels, registered as torch.library.triton_op so torch.compile traces them without graph breaks
# --------------------------------------------------------------------------------------------------------------
if HAVE_TRITON:
    # 2-D tiles [rows, features], contiguous along the feature axis; one config in the interpreter (CPU tests).
    _EW_CONFIGS = [
        triton.Config({"BM": 16, "BN": 256}, num_warps=4),
        triton.Config({"BM": 32, "BN": 128}, num_warps=4),
        triton.Config({"BM": 32, "BN": 256}, num_warps=8),
        triton.Config({"BM": 8, "BN": 512}, num_warps=4),
    ][: 1 if INTERPRET else None]

    @triton.autotune(configs=_EW_CONFIGS, key=["N"])
    @triton.jit
    def _swiglu_fwd_kernel(gu_ptr, h_ptr, M, N, s_gu, s_h, BM: tl.constexpr, BN: tl.constexpr):
        # gu [M, 2N] (gate columns [0, N), up [N, 2N)) -> h [M, N]
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        m = (rows < M)[:, None] & (cols < N)[None, :]
        g_ptrs = gu_ptr + rows[:, None].to(tl.int64) * s_gu + cols[None, :]
        g = tl.load(g_ptrs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(g_ptrs + N, mask=m, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + rows[:, None].to(tl.int64) * s_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=m)

    @triton.autotune(configs=_EW_CONFIGS, key=["N"])
    @triton.jit
    def _swiglu_bwd_kernel(gh_ptr, gu_ptr, dgu_ptr, h_ptr, M, N, s_gh, s_gu, s_dgu, s_h,
                           BM: tl.constexpr, BN: tl.constexpr):
        # grad_h [M, N], gu [M, 2N] -> grad_gu [M, 2N] and the recomputed h [M, N]
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        m = (rows < M)[:, None] & (cols < N)[None, :]
        r64 = rows[:, None].to(tl.int64)
        g_ptrs = gu_ptr + r64 * s_gu + cols[None, :]
        g = tl.load(g_ptrs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(g_ptrs + N, mask=m, other=0.0).to(tl.float32)
        gh = tl.load(gh_ptr + r64 * s_gh + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sg = tl.sigmoid(g)
        silu = g * sg
        d_ptrs = dgu_ptr + r64 * s_dgu + cols[None, :]
        tl.store(d_ptrs, (gh * u * (sg * (1.0 + g * (1.0 - sg)))).to(dgu_ptr.dtype.element_ty), mask=m)
        tl.store(d_ptrs + N, (gh * silu).to(dgu_ptr.dtype.element_ty), mask=m)
        tl.store(h_ptr + r64 * s_h + cols[None, :], (silu * u).to(h_ptr.dtype.element_ty), mask=m)

    # BT tokens per program, every head of a token in registers (the cos/sin rows are read once per token).
    _ROPE_CONFIGS = [
        triton.Config({"BT": 8}, num_warps=2),
        triton.Config({"BT": 16}, num_warps=4),
        triton.Config({"BT": 32}, num_warps=4),
        triton.Config({"BT": 64}, num_warps=8),
    ][: 1 if INTERPRET else None]

    @triton.autotune(configs=_ROPE_CONFIGS, key=["S", "NQ", "NK", "HALF"])
    @triton.jit
    def _rope_fwd_kernel(x_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, T, S,
                         s_xb, s_xs, s_xh, s_cs, s_qb, s_qh, s_qs, s_kb, s_kh, s_ks,
                         NQ: tl.constexpr, NK: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr):
        # x: [B, S, NQ+2NK, 2*HALF] (any strides, last 1) -> q [B, NQ, S, hd], k, v [B, NK, S, hd]
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        tm = (t < T)[:, None]
        b = (t // S).to(tl.int64)
        s = t % S
        c = tl.arange(0, HALF)[None, :]
        cs_off = s[:, None] * s_cs + c
        c1 = tl.load(cos_ptr + cs_off, mask=tm, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cs_off + HALF, mask=tm, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + cs_off, mask=tm, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + cs_off + HALF, mask=tm, other=0.0).to(tl.float32)
        x_row = (b * s_xb + s * s_xs)[:, None] + c
        for hh in tl.static_range(NQ + 2 * NK):
            src = x_ptr + x_row + hh * s_xh
            x1 = tl.load(src, mask=tm, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF, mask=tm, other=0.0).to(tl.float32)
            if hh < NQ:
                dst = q_ptr + (b * s_qb + s * s_qs)[:, None] + c + hh * s_qh
            elif hh < NQ + NK:
                dst = k_ptr + (b * s_kb + s * s_ks)[:, None] + c + (hh - NQ) * s_kh
            else:
                dst = v_ptr + (b * s_kb + s * s_ks)[:, None] + c + (hh - NQ - NK) * s_kh
            if hh < NQ + NK:  # rotate: [x1, x2] * cos + [-x2, x1] * sin
                o1 = x1 * c1 - x2 * s1
                o2 = x2 * c2 + x1 * s2
            else:
                o1 = x1
                o2 = x2
            tl.store(dst, o1.to(q_ptr.dtype.element_ty), mask=tm)
            tl.store(dst + HALF, o2.to(q_ptr.dtype.element_ty), mask=tm)

    @triton.autotune(configs=_ROPE_CONFIGS, key=["S", "NQ", "NK", "HALF"])
    @triton.jit
    def _rope_bwd_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dx_ptr, T, S,
                         s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_cs, s_xb, s_xs, s_xh,
                         NQ: tl.constexpr, NK: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr):
        # dq [B, NQ, S, hd], dk, dv [B, NK, S, hd] (any strides, last 1) -> dx [B, S, NQ+2NK, hd]
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        tm = (t < T)[:, None]
        b = (t // S).to(tl.int64)
        s = t % S
        c = tl.arange(0, HALF)[None, :]
        cs_off = s[:, None] * s_cs + c
        c1 = tl.load(cos_ptr + cs_off, mask=tm, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cs_off + HALF, mask=tm, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + cs_off, mask=tm, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + cs_off + HALF, mask=tm, other=0.0).to(tl.float32)
        x_row = (b * s_xb + s * s_xs)[:, None] + c
        for hh in tl.static_range(NQ + 2 * NK):
            if hh < NQ:
                src = dq_ptr + (b * s_qb + s * s_qs)[:, None] + c + hh * s_qh
            elif hh < NQ + NK:
                src = dk_ptr + (b * s_kb + s * s_ks)[:, None] + c + (hh - NQ) * s_kh
            else:
                src = dv_ptr + (b * s_vb + s * s_vs)[:, None] + c + (hh - NQ - NK) * s_vh
            g1 = tl.load(src, mask=tm, other=0.0).to(tl.float32)
            g2 = tl.load(src + HALF, mask=tm, other=0.0).to(tl.float32)
            if hh < NQ + NK:  # transpose of the rotation
                o1 = g1 * c1 + g2 * s2
                o2 = g2 * c2 - g1 * s1
            else:
                o1 = g1
                o2 = g2
            dst = dx_ptr + x_row + hh * s_xh
            tl.store(dst, o1.to(dx_ptr.dtype.element_ty), mask=tm)
            tl.store(dst + HALF, o2.to(dx_ptr.dtype.element_ty), mask=tm)

    @torch.library.triton_op("trm::swiglu_fwd", mutates_args=())
    def _swiglu_fwd_op(gu: torch.Tensor) -> torch.Tensor:
        M, N = gu.shape[0], gu.shape[1] // 2
        h = torch.empty((M, N), dtype=gu.dtype, device=gu.device)
        grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))
        torch.library.wrap_triton(_swiglu_fwd_kernel)[grid](gu, h, M, N, gu.stride(0), h.stride(0))
        return h

    @torch.library.triton_op("trm::swiglu_bwd", mutates_args=())
    def _swiglu_bwd_op(grad_h: torch.Tensor, gu: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        M, N = gu.shape[0], gu.shape[1] // 2
        dgu = torch.empty((M, 2 * N), dtype=gu.dtype, device=gu.device)
        h = torch.empty((M, N), dtype=gu.dtype, device=gu.device)
        grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))
        torch.library.wrap_triton(_swiglu_bwd_kernel)[grid](grad_h, gu, dgu, h, M, N, grad_h.stride(0), gu.stride(0),
                                                            dgu.stride(0), h.stride(0))
        return dgu, h

    @torch.library.triton_op("trm::rope_fwd", mutates_args=())
    def _rope_fwd_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int,
                     nkv: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, _, hd = qkv.shape
        q = torch.empty((B, nh, S, hd), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty((B, nkv, S, hd), dtype=qkv.dtype, device=qkv.device)
        v = torch.empty((B, nkv, S, hd), dtype=qkv.dtype, device=qkv.device)
        grid = lambda meta: (triton.cdiv(B * S, meta["BT"]),)
        torch.library.wrap_triton(_rope_fwd_kernel)[grid](
            qkv, cos, sin, q, k, v, B * S, S, qkv.stride(0), qkv.stride(1), qkv.stride(2), cos.stride(0),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), NQ=nh, NK=nkv, HALF=hd // 2)
        return q, k, v

    @torch.library.triton_op("trm::rope_bwd", mutates_args=())
    def _rope_bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     nh: int, nkv: int) -> torch.Tensor:
        B, _, S, hd = dq.shape
        dx = torch.empty((B, S, nh + 2 * nkv, hd), dtype=dq.dtype, device=dq.device)
        grid = lambda meta: (triton.cdiv(B * S, meta["BT"]),)
        torch.library.wrap_triton(_rope_bwd_kernel)[grid](
            dq, dk, dv, cos, sin, dx, B * S, S, dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1),
            dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), cos.stride(0), dx.stride(0), dx.stride(1),
            dx.stride(2), NQ=nh, NK=nkv, HALF=hd // 2)
        return dx


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def swiglu_fwd(gu: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up from gu [M, 2N] (gate first): the kernel where it runs, else the same maths in torch."""
    return _swiglu_fwd_op(_last_dim_contiguous(gu)) if _kernels_run_on(gu) else _torch_swiglu_fwd(gu)


def swiglu_bwd(grad_h: torch.Tensor, gu: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_gu, h) in one pass over grad_h [M, N] and gu [M, 2N]."""
    if _kernels_run_on(gu):
        return _swiglu_bwd_op(_last_dim_contiguous(grad_h), _last_dim_contiguous(gu))
    return _torch_swiglu_bwd(grad_h, gu)


def rope_fwd(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int):
    if _kernels_run_on(qkv):
        return _rope_fwd_op(_last_dim_contiguous(qkv), cos.contiguous(), sin.contiguous(), nh, nkv)
    return _torch_rope_fwd(qkv, cos, sin, nh, nkv)


def rope_bwd(dq, dk, dv, cos, sin, nh: int, nkv: int) -> torch.Tensor:
    if _kernels_run_on(dq):
        dq, dk, dv = (_last_dim_contiguous(t) for t in (dq, dk, dv))
        return _rope_bwd_op(dq, dk, dv, cos.contiguous(), sin.contiguous(), nh, nkv)
    return _torch_rope_bwd(dq, dk, dv, cos, sin, nh, nkv)


# --------------------------------------------------------------------------------------------------------------
# Autograd wiring: what models/layers.py calls
# --------------------------------------------------------------------------------------------------------------
class _SwiGLUFunction(torch.autograd.Function):
    """down(silu(gate) * up) of x [M, D]; keeps x and gate_up, recomputes h inside the backward kernel."""

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down):
        gu = x @ w_gate_up.t()  # [M, 2I]
        out = swiglu_fwd(gu) @ w_down.t()  # [M, D_out]
        ctx.save_for_backward(x, gu, w_gate_up, w_down)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gu, w_gate_up, w_down = ctx.saved_tensors
        grad_gu, h = swiglu_bwd(grad_out @ w_down, gu)
        return grad_gu @ w_gate_up, grad_gu.t() @ x, grad_out.t() @ h


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> down(silu(gate) * up) [..., D_out]; weights already in x's dtype, gate rows first, no bias."""
    out = _SwiGLUFunction.apply(x.reshape(-1, x.shape[-1]), w_gate_up, w_down)
    return out.view(*x.shape[:-1], w_down.shape[0])


class _RopeQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, nh, nkv):
        ctx.save_for_backward(cos, sin)
        ctx.nh, ctx.nkv = nh, nkv
        return rope_fwd(qkv, cos, sin, nh, nkv)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        return rope_bwd(dq, dk, dv, cos, sin, ctx.nh, ctx.nkv), None, None, None, None


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int):
    """qkv [B, S, nh+2nkv, hd] (query heads, key heads, value heads) -> q [B, nh, S, hd], k, v [B, nkv, S, hd],
    contiguous, q and k rotated by the RoPE tables cos, sin [S, hd] (no gradient to the tables)."""
    return _RopeQKVFunction.apply(qkv, cos, sin, nh, nkv)
