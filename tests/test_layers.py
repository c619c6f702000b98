"""Layers and model config on CPU: SwiGLU widths, learned / no positions, and what the config accepts and refuses."""


import pytest
import torch

from models.layers import SwiGLU, swiglu_intermediate_size
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
from tests.trm_small import small_config, make_model, make_batch, B, L, V


@pytest.mark.parametrize("hidden,inter", [(512, 1536), (97, 512), (916, 2560), (64, 256)])
def test_swiglu_intermediate_sizes(hidden, inter):
    assert swiglu_intermediate_size(hidden, 4) == inter
    with torch.device("meta"):
        mlp = SwiGLU(hidden, 4)
    assert mlp.gate_up_proj.weight.shape == (2 * inter, hidden)
    assert mlp.down_proj.weight.shape == (hidden, inter)


def test_learned_positions_and_no_positions_build_and_run():
    for pos in ("learned", "none"):
        model = make_model(pos_encodings=pos)
        assert hasattr(model.inner, "embed_pos") == (pos == "learned")
        assert not hasattr(model.inner, "rotary_emb")
        batch = make_batch()
        model.eval()
        with torch.no_grad():
            _, out = model(model.initial_carry(batch), batch)
        assert torch.isfinite(out["logits"]).all()


def test_config_ignores_unknown_keys_and_rejects_bad_combinations():
    TinyRecursiveReasoningModel_ACTV1(small_config(some_future_key=1))
    with pytest.raises(ValueError):
        TinyRecursiveReasoningModel_ACTV1(small_config(forward_dtype="float99"))
    with pytest.raises(ValueError):
        TinyRecursiveReasoningModel_ACTV1(small_config(forward_dtype="int32"))
    with pytest.raises(ValueError):
        TinyRecursiveReasoningModel_ACTV1(small_config(puzzle_emb_ndim=100, puzzle_emb_len=3))  # 100 > 3 * 32
    with pytest.raises(ValueError):
        TinyRecursiveReasoningModel_ACTV1(small_config(puzzle_emb_ndim=0, puzzle_emb_len=2))
    model = TinyRecursiveReasoningModel_ACTV1(small_config(puzzle_emb_ndim=0, puzzle_emb_len=0))
    batch = make_batch()
    model.eval()
    with torch.no_grad():
        _, out = model(model.initial_carry(batch), batch)
    assert out["logits"].shape == (B, L, V)
