"""AdamATan2: the pure-PyTorch version against a float64 transcription of the rule, lr 0 and state-dict round
trip, low-precision parameters, and the fused CUDA kernel where one is installed."""

import math

import pytest
import torch

from models.optimizers import AdamATan2, _adam_atan2_foreach, adam_atan2_backend


def _adam_atan2_float64(param, grads, lr, betas, wd):
    """The rule of docs/compatibility.md section 9, written out in float64."""
    b1, b2 = betas
    p, m, v = param.double().clone(), torch.zeros_like(param, dtype=torch.float64), torch.zeros_like(param, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = m + (1 - b1) * (g - m)
        v = v + (1 - b2) * (g * g - v)
        p = p - lr / (1 - b1**t) * torch.atan2(m, v.sqrt() / math.sqrt(1 - b2**t))
    return p, m, v


def test_adam_atan2_pure_matches_float64_rule():
    torch.manual_seed(0)
    lr, betas, wd = 1e-2, (0.9, 0.95), 0.1
    w = torch.nn.Parameter(torch.randn(37, 5))
    b = torch.nn.Parameter(torch.randn(5))
    frozen = torch.nn.Parameter(torch.randn(3))  # never gets a grad: skipped, no decay, no state
    frozen_before = frozen.detach().clone()
    opt = AdamATan2([w, b, frozen], lr=lr, betas=betas, weight_decay=wd)
    w0, b0 = w.detach().clone(), b.detach().clone()

    g_w = [torch.randn(37, 5) * 10 ** (-k % 3) for k in range(6)]
    g_b = [torch.randn(5) for _ in range(6)]
    g_w[2][0] = 0  # zero grad and zero moments give atan2(0, 0) = 0 at the first step of these rows
    for gw, gb in zip(g_w, g_b):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()

    for param, start, gs in ((w, w0, g_w), (b, b0, g_b)):
        p, m, v = _adam_atan2_float64(start, gs, lr, betas, wd)
        state = opt.state[param]
        assert state["step"].dtype == torch.float32 and state["step"].shape == () and state["step"].item() == 6
        torch.testing.assert_close(param.detach().double(), p, rtol=0, atol=1e-6)
        torch.testing.assert_close(state["exp_avg"].double(), m, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(state["exp_avg_sq"].double(), v, rtol=1e-5, atol=1e-10)
    assert torch.equal(frozen.detach(), frozen_before) and frozen not in opt.state


def test_adam_atan2_lr_zero_allowed_and_state_dict_round_trip():
    w = torch.nn.Parameter(torch.ones(4))
    opt = AdamATan2([w], lr=0.0)  # pretrain builds it with lr 0 and sets the scheduled lr each step
    w.grad = torch.ones(4)
    opt.step()
    assert torch.equal(w.detach(), torch.ones(4))
    opt2 = AdamATan2([w], lr=0.0)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[w]["step"].item() == 1


def test_adam_atan2_low_precision_params_use_fp32_math():
    torch.manual_seed(0)
    p16 = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
    p32 = torch.nn.Parameter(p16.detach().float())
    g = torch.randn(64).to(torch.bfloat16)
    p16.grad, p32.grad = g.clone(), g.float()
    AdamATan2([p16], lr=1e-2).step()
    AdamATan2([p32], lr=1e-2).step()
    assert p16.dtype == torch.bfloat16
    assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))


@pytest.mark.skipif(adam_atan2_backend is None or not torch.cuda.is_available(), reason="needs CUDA and the adam_atan2 package's CUDA backend")
def test_adam_atan2_fused_matches_pure():
    import adam_atan2_backend

    torch.manual_seed(0)
    lr, b1, b2, wd = 1e-3, 0.9, 0.95, 0.1
    p_fused = [torch.randn(4096, device="cuda"), torch.randn(63, 17, device="cuda")]
    p_pure = [p.clone() for p in p_fused]
    states = [[[torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
               [torch.zeros((), device="cuda") for _ in ps]] for ps in (p_fused, p_pure)]
    for _ in range(20):
        grads = [torch.randn_like(p) * 1e-3 for p in p_fused]
        for ps, (m, v, s), fused in ((p_fused, states[0], True), (p_pure, states[1], False)):
            torch._foreach_add_(s, 1)
            if fused:
                adam_atan2_backend.adam_atan2_cuda_impl_(ps, grads, m, v, s, lr, b1, b2, wd)
            else:
                _adam_atan2_foreach(ps, grads, m, v, s, lr, b1, b2, wd)
    for a, b in zip(p_fused, p_pure):
        # Same arithmetic up to how nvcc fuses inside the kernel's atan2: rare 1-ulp differences.
        assert (a != b).float().mean().item() < 0.01
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
