"""Initialisation: the truncated normal's std, bounds and dtype, and the reference's draw order (same seed, same
weights)."""

import math

import pytest
import torch

from models.common import trunc_normal_init_
from models.layers import swiglu_intermediate_size
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
from tests.trm_small import small_config, L, V


def test_trunc_normal_std_and_bounds():
    torch.manual_seed(0)
    for std in (1.0, 0.02):
        t = trunc_normal_init_(torch.empty(1_000_000), std=std)
        assert t.std().item() == pytest.approx(std, rel=5e-3)
        assert t.mean().item() == pytest.approx(0.0, abs=5e-3 * std)
        bound = 2 * std / math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(math.sqrt(2)))
        assert bound == pytest.approx(2 * 1.13685 * std, rel=1e-5)
        assert t.abs().max().item() <= bound * (1 + 1e-6)
        assert t.abs().max().item() > 0.99 * bound

    state = torch.get_rng_state()
    z = trunc_normal_init_(torch.full((10,), 3.0), std=0)
    assert torch.all(z == 0) and torch.equal(torch.get_rng_state(), state)  # std 0: zeros, no draw

    h = trunc_normal_init_(torch.empty(4096, dtype=torch.bfloat16), std=1)
    assert h.dtype == torch.bfloat16


def test_init_draw_order_matches_reference():
    """Same seed, same weights as the reference: replay its draw order by hand (docs/compatibility.md section 4)."""
    cfg = small_config(pos_encodings="learned", L_layers=2)
    torch.manual_seed(7)
    model = TinyRecursiveReasoningModel_ACTV1(cfg)

    torch.manual_seed(7)
    D, S = 32, L + 2
    inter = swiglu_intermediate_size(D, 2)

    def draw(*shape, std, dtype=torch.float32):
        return trunc_normal_init_(torch.empty(*shape, dtype=dtype), std=std)

    expected = {"inner.embed_tokens.embedding_weight": draw(V, D, std=D**-0.5),
                "inner.lm_head.weight": draw(V, D, std=D**-0.5)}
    draw(2, D, std=D**-0.5)  # q_head weight: drawn, then zeroed
    expected["inner.embed_pos.embedding_weight"] = draw(S, D, std=D**-0.5)
    for i in range(2):
        prefix = f"inner.L_level.layers.{i}."
        expected[prefix + "self_attn.qkv_proj.weight"] = draw(3 * D, D, std=D**-0.5)
        expected[prefix + "self_attn.o_proj.weight"] = draw(D, D, std=D**-0.5)
        expected[prefix + "mlp.gate_up_proj.weight"] = draw(2 * inter, D, std=D**-0.5)
        expected[prefix + "mlp.down_proj.weight"] = draw(D, inter, std=inter**-0.5)
    expected["inner.H_init"] = draw(D, std=1)
    expected["inner.L_init"] = draw(D, std=1)

    state = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    assert torch.all(state["inner.puzzle_emb.weights"] == 0)  # zero init, no draw
