"""AdamATan2: Adam with atan2(m, sqrt(v)) in place of m / (sqrt(v) + eps) — scale invariant, no epsilon.

Same rule as the `adam-atan2` package used by the reference (its fused CUDA kernel runs when it is installed
and the parameters are on CUDA); elsewhere a pure-PyTorch version with the same arithmetic. Not the rule of the
`adam-atan2-pytorch` package, whose steps are ~1.27x larger.
"""

import math
from collections import defaultdict
from typing import List, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

try:  # fused CUDA kernel of the `adam-atan2` package (needs torch imported first)
    import adam_atan2_backend
except ImportError:
    adam_atan2_backend = None


class AdamATan2(Optimizer):
    """Per step t (counted per parameter), with decoupled weight decay on every parameter that has a gradient:

        θ <- θ·(1 - lr·wd)
        m <- m + (1-β1)(g - m);   v <- v + (1-β2)(g² - v)
        θ <- θ - lr/(1-β1^t) · atan2(m, sqrt(v)/sqrt(1-β2^t))

    State per parameter as in the reference package: `step` (fp32 scalar tensor), `exp_avg`, `exp_avg_sq`.
    """

    def __init__(self, params, lr: float = 1e-4, betas: Tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamATan2 does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device:  # e.g. loaded with map_location="cpu"
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue

            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
            grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps])
            for (device, _), ((d_params, d_grads, d_exp_avgs, d_exp_avg_sqs, d_steps), _) in grouped.items():
                torch._foreach_add_(d_steps, 1)  # incremented first: the first update uses t = 1
                if adam_atan2_backend is not None and device.type == "cuda":
                    adam_atan2_backend.adam_atan2_cuda_impl_(d_params, d_grads, d_exp_avgs, d_exp_avg_sqs, d_steps,
                                                              hyper["lr"], beta1, beta2, hyper["weight_decay"])
                else:
                    _adam_atan2_foreach(d_params, d_grads, d_exp_avgs, d_exp_avg_sqs, d_steps, **hyper)
        return loss


def _adam_atan2_foreach(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                        steps: List[Tensor], lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """Pure-PyTorch AdamATan2 following the kernel's arithmetic: hyper-parameters formed in double and rounded
    to fp32; math in fp32 (fp64 for fp64 parameters). `x.add_(y, alpha=a)` is fma(a, y, x) on CUDA and in
    vectorised CPU loops, which reproduces the kernel's fused multiply-adds:
      moments  m <- fma(t, g, fma(-t, m, m))             (bitwise equal to the kernel on an H200)
      update   θ <- fma(1 - lr·wd, θ, -(step_size·atan2))  (nvcc contracts the decay into the update;
                                                          ~0.1% of elements still differ by an ulp)"""
    # Low-precision parameters: do the math in fp32 copies and write back, like the kernel's opmath.
    low_precision = params[0].dtype in (torch.float16, torch.bfloat16)
    if low_precision:
        originals = (params, exp_avgs, exp_avg_sqs)
        params, grads, exp_avgs, exp_avg_sqs = ([t.float() for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs))

    torch._foreach_add_(exp_avgs, exp_avgs, alpha=-(1 - beta1))  # fma(-t, m, m)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)  # fma(t, g, .)
    grads_sq = torch._foreach_mul(grads, grads)
    torch._foreach_add_(exp_avg_sqs, exp_avg_sqs, alpha=-(1 - beta2))
    torch._foreach_add_(exp_avg_sqs, grads_sq, alpha=1 - beta2)

    # Bias corrections depend on each parameter's step: read all steps with one host sync, group equal ones.
    by_step = defaultdict(list)
    for i, t in enumerate(torch.stack(steps).tolist()):
        by_step[t].append(i)
    for t, idx in by_step.items():
        step_size = lr / (1 - beta1**t)
        bias_correction2_sqrt = math.sqrt(1 - beta2**t)
        denoms = torch._foreach_sqrt([exp_avg_sqs[i] for i in idx])
        torch._foreach_div_(denoms, bias_correction2_sqrt)
        updates = [torch.atan2(exp_avgs[i], d) for i, d in zip(idx, denoms)]
        torch._foreach_mul_(updates, -step_size)
        group_params = [params[i] for i in idx]
        torch._foreach_add_(updates, group_params, alpha=1 - lr * weight_decay)  # decayed θ + update, one rounding
        torch._foreach_copy_(group_params, updates)

    if low_precision:
        for dst_list, src_list in zip(originals, (params, exp_avgs, exp_avg_sqs)):
            torch._foreach_copy_(dst_list, src_list)
