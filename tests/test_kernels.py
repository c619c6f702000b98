"""The fused SwiGLU / RoPE kernels (models/kernels.py, arch `fused_kernels`): the layers take them only on CUDA (RoPE
only where autograd records), the switch adds no checkpoint keys, the kernels' maths equals the plain layers' in
float32 (outputs and gradients), and, where Triton's interpreter runs, the Triton kernels equal that maths."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from models import kernels
from models.layers import Attention, SwiGLU, apply_rotary_pos_emb
from tests.conftest import REPO
from tests.test_perf_paths import loss_head, one_train_step
from tests.trm_small import make_batch


def count_calls(monkeypatch, force_cuda: bool) -> dict:
    """Count the layers' calls into the kernels; `force_cuda`: the dispatch answers as on a CUDA device with
    Triton, so the kernels' torch maths runs on the CPU."""
    calls = {"swiglu": 0, "rope_qkv": 0}
    for name in calls:
        real = getattr(kernels, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(kernels, name, counted)
    if force_cuda:
        monkeypatch.setattr(kernels, "fused_applies", lambda x: True)
    return calls


def test_the_switch_reaches_the_layers_and_adds_no_checkpoint_keys():
    on, off = loss_head(), loss_head(fused_kernels=False)
    layers = lambda m: [mod for mod in m.modules() if isinstance(mod, (Attention, SwiGLU))]
    assert len(layers(on)) == 2 and all(mod.fused_kernels for mod in layers(on))  # on by default
    assert not any(mod.fused_kernels for mod in layers(off))
    assert list(on.state_dict()) == list(off.state_dict())
    assert not SwiGLU(8, 2).fused_kernels  # a layer built alone is plain
    # recompute keeps the plain layers: the compiler recomputes through them, not through the kernels
    assert not any(mod.fused_kernels for mod in layers(loss_head(recompute=True)))


def test_the_switch_is_an_optional_arch_key():
    """`+arch.fused_kernels=False` composes; without it the saved arch (a checkpoint's description) has no such key,
    so configs saved before the switch existed and after it read the same."""
    from training.config import compose_config

    cfg = os.path.join(REPO, "config", "cfg_pretrain.yaml")
    assert "fused_kernels" not in compose_config(cfg, []).arch.model_dump()
    assert compose_config(cfg, ["+arch.fused_kernels=False"]).arch.model_dump()["fused_kernels"] is False


def test_cpu_takes_the_plain_layers(monkeypatch):
    calls = count_calls(monkeypatch, force_cuda=False)
    one_train_step(loss_head(), make_batch())
    assert calls == {"swiglu": 0, "rope_qkv": 0}


@pytest.mark.parametrize("variant", [{}, {"mlp_t": True, "pos_encodings": "none"}])
def test_fused_path_matches_the_plain_one_in_float32(monkeypatch, variant):
    """One train step with the dispatch forced on (the kernels' torch maths on CPU) against fused_kernels=False:
    the same loss, logits, gradients and weights; RoPE goes through the kernels only in the gradient cycle."""
    batch = make_batch()
    plain = one_train_step(loss_head(fused_kernels=False, **variant), batch)
    calls = count_calls(monkeypatch, force_cuda=True)
    fused = one_train_step(loss_head(**variant), batch)
    # small_config: H_cycles 2, L_cycles 2, one layer: 3 layer calls per H cycle, only the last with gradients;
    # MLP-T's token mixer is a second SwiGLU per call.
    mlp_t = variant.get("mlp_t", False)
    assert calls == {"swiglu": 12 if mlp_t else 6, "rope_qkv": 0 if mlp_t else 3}
    torch.testing.assert_close(fused[0].inner_carry.z_H, plain[0].inner_carry.z_H)
    torch.testing.assert_close(fused[1], plain[1])
    torch.testing.assert_close(fused[2], plain[2])
    assert fused[3].keys() == plain[3].keys() and len(plain[3]) > 0
    for name in plain[3]:
        torch.testing.assert_close(fused[3][name], plain[3][name], rtol=1e-4, atol=1e-6, msg=name)
    for name in plain[5]:
        torch.testing.assert_close(fused[5][name], plain[5][name], rtol=1e-4, atol=1e-6, msg=name)


def test_evaluation_never_takes_the_rope_kernels(monkeypatch):
    calls = count_calls(monkeypatch, force_cuda=True)
    model, batch = loss_head(), make_batch()
    model.eval()
    with torch.no_grad():
        model(return_keys=(), carry=model.initial_carry(batch), batch=batch)
    assert calls["rope_qkv"] == 0 and calls["swiglu"] == 6


def rope_tables(S, hd):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(torch.arange(S, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


def plain_rope_qkv(qkv, cos, sin, nh, nkv):
    q, k, v = qkv[:, :, :nh], qkv[:, :, nh : nh + nkv], qkv[:, :, nh + nkv :]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return tuple(t.transpose(1, 2) for t in (q, k, v))


@pytest.mark.parametrize("nh,nkv", [(2, 2), (4, 2)])
def test_rope_function_matches_the_plain_rotation(nh, nkv):
    torch.manual_seed(0)
    B, S, hd = 3, 7, 16
    cos, sin = rope_tables(S, hd)
    qkv = torch.randn(B, S, nh + 2 * nkv, hd, requires_grad=True)
    want = plain_rope_qkv(qkv, cos, sin, nh, nkv)
    got = kernels.rope_qkv(qkv, cos, sin, nh, nkv)
    # Gradients as SDPA's backward hands them over: [B, h, S, hd] views of [B, S, h, hd] tensors.
    grads = [torch.randn(B, S, t.shape[1], hd).transpose(1, 2) for t in want]
    for a, b in zip(got, want):
        assert a.is_contiguous() and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (d_want,) = torch.autograd.grad(want, qkv, grads)
    (d_got,) = torch.autograd.grad(got, qkv, grads)
    torch.testing.assert_close(d_got, d_want, rtol=1e-6, atol=1e-6)


def test_swiglu_function_matches_the_plain_layer():
    torch.manual_seed(0)
    layer = SwiGLU(16, 4)
    x = torch.randn(3, 5, 16, requires_grad=True)
    grad_out = torch.randn(3, 5, 16)
    want = layer(x)
    want_grads = torch.autograd.grad(want, [x, *layer.parameters()], grad_out)
    got = kernels.swiglu(x, layer.gate_up_proj.weight, layer.down_proj.weight)
    got_grads = torch.autograd.grad(got, [x, *layer.parameters()], grad_out)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    # The backward's recomputed h is the forward's.
    gu = torch.randn(6, 2 * 24)
    torch.testing.assert_close(kernels.swiglu_bwd(torch.randn(6, 24), gu)[1], kernels.swiglu_fwd(gu), rtol=0, atol=0)


INTERPRETER_CHECK = textwrap.dedent("""
    import sys
    import torch
    from models import kernels
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)

    try:  # the interpreter itself (not our kernels) may not run with this torch / Triton pair
        x = torch.zeros(8)
        _probe[(1,)](x, BLOCK=8)
        assert bool((x == 1).all())
    except Exception as e:
        print(f"interpreter does not run: {type(e).__name__}: {e}")
        sys.exit(77)
    assert kernels.HAVE_TRITON and kernels._kernels_run_on(x)

    torch.manual_seed(0)
    M, N, B, S, nh, nkv, hd = 37, 40, 2, 5, 2, 1, 16
    gu, gh = torch.randn(M, 2 * N), torch.randn(M, N)
    qkv = torch.randn(B, S, nh + 2 * nkv, hd)
    d3 = [torch.randn(B, S, n, hd).transpose(1, 2) for n in (nh, nkv, nkv)]  # SDPA's gradient layout
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    emb = torch.outer(torch.arange(S, dtype=torch.float32), inv).repeat(1, 2)
    cos, sin = emb.cos(), emb.sin()
    cases = [("swiglu_fwd", kernels.swiglu_fwd, kernels._torch_swiglu_fwd, (gu,)),
             ("swiglu_bwd", kernels.swiglu_bwd, kernels._torch_swiglu_bwd, (gh, gu)),
             ("rope_fwd", kernels.rope_fwd, kernels._torch_rope_fwd, (qkv, cos, sin, nh, nkv)),
             ("rope_bwd", kernels.rope_bwd, kernels._torch_rope_bwd, (*d3, cos, sin, nh, nkv))]
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2.0**-7)):  # bf16: 1 ulp (the interpreter truncates)
        for name, kernel, reference, args in cases:
            args = [a.to(dtype) if isinstance(a, torch.Tensor) and a is not cos and a is not sin else a for a in args]
            got, want = kernel(*args), reference(*args)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            for i, (a, b) in enumerate(zip(got, want)):
                assert a.shape == b.shape and a.dtype == b.dtype, (name, i, a.shape, b.shape)
                err = ((a.float() - b.float()).abs() - tol * b.float().abs()).max().item()
                assert err <= 1e-6, (name, dtype, i, err)
    print("kernels ok")
""")


def test_triton_kernels_under_the_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and "kernels ok" in proc.stdout, proc.stdout + proc.stderr
