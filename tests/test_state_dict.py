"""Pins the checkpoint contract (docs/compatibility.md section 5): state-dict key names, order, shapes and dtypes of
the loss head wrapping the TRM, and the parameter counts, for the default architecture on Sudoku, Maze and ARC
shapes. Built on the meta device: no memory, no init cost, even with the full ARC puzzle table."""

import pytest
import torch

from models.losses import ACTLossHead
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1

D, P = 512, 16

# (vocab_size, seq_len, num_puzzle_identifiers) of the published datasets
TASKS = {"sudoku": (11, 81, 1), "maze": (6, 900, 1), "arc": (12, 900, 876_406)}


def build(task, mlp_t=False, pos_encodings="rope"):
    V, L, n_ids = TASKS[task]
    config = dict(batch_size=768, seq_len=L, vocab_size=V, num_puzzle_identifiers=n_ids,
                  # config/arch/trm.yaml
                  H_cycles=3, L_cycles=6, H_layers=0, L_layers=2, hidden_size=D, num_heads=8, expansion=4,
                  puzzle_emb_ndim=D, puzzle_emb_len=P, pos_encodings=pos_encodings, forward_dtype="bfloat16",
                  mlp_t=mlp_t, halt_max_steps=16, halt_exploration_prob=0.1, no_ACT_continue=True, causal=False)
    with torch.device("meta"):
        return ACTLossHead(TinyRecursiveReasoningModel_ACTV1(config), loss_type="stablemax_cross_entropy")


def expected_state_dict(task, mlp_t=False, learned=False):
    """[(key, shape, dtype)] in checkpoint order; written out in full on purpose."""
    V, L, n_ids = TASKS[task]
    S = L + P
    inter_t = {97: 512, 916: 2560}[S]
    f32, bf16 = torch.float32, torch.bfloat16
    keys = [
        ("model.inner.H_init", (D,), bf16),
        ("model.inner.L_init", (D,), bf16),
        ("model.inner.embed_tokens.embedding_weight", (V, D), f32),
        ("model.inner.lm_head.weight", (V, D), f32),
        ("model.inner.q_head.weight", (2, D), f32),
        ("model.inner.q_head.bias", (2,), f32),
        ("model.inner.puzzle_emb.weights", (n_ids, D), f32),
    ]
    if learned:
        keys.append(("model.inner.embed_pos.embedding_weight", (S, D), f32))
    for i in range(2):
        if mlp_t:
            keys += [
                (f"model.inner.L_level.layers.{i}.mlp_t.gate_up_proj.weight", (2 * inter_t, S), f32),
                (f"model.inner.L_level.layers.{i}.mlp_t.down_proj.weight", (S, inter_t), f32),
            ]
        else:
            keys += [
                (f"model.inner.L_level.layers.{i}.self_attn.qkv_proj.weight", (1536, D), f32),
                (f"model.inner.L_level.layers.{i}.self_attn.o_proj.weight", (D, D), f32),
            ]
        keys += [
            (f"model.inner.L_level.layers.{i}.mlp.gate_up_proj.weight", (3072, D), f32),
            (f"model.inner.L_level.layers.{i}.mlp.down_proj.weight", (D, 1536), f32),
        ]
    return keys


CASES = [
    # task, mlp_t, pos_encodings
    ("sudoku", False, "rope"),
    ("sudoku", True, "none"),  # the Sudoku MLP-T recipe
    ("sudoku", False, "learned"),
    ("maze", False, "rope"),
    ("maze", True, "none"),
    ("arc", False, "rope"),
    ("arc", True, "none"),
]


@pytest.mark.parametrize("task,mlp_t,pos", CASES)
def test_state_dict_keys_shapes_dtypes(task, mlp_t, pos):
    model = build(task, mlp_t=mlp_t, pos_encodings=pos)
    got = [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]
    assert got == expected_state_dict(task, mlp_t=mlp_t, learned=pos == "learned")


def test_mlp_t_weight_shapes_of_reference_table():
    sd = build("sudoku", mlp_t=True).state_dict()
    assert tuple(sd["model.inner.L_level.layers.0.mlp_t.gate_up_proj.weight"].shape) == (1024, 97)
    assert tuple(sd["model.inner.L_level.layers.0.mlp_t.down_proj.weight"].shape) == (97, 512)
    sd = build("maze", mlp_t=True).state_dict()
    assert tuple(sd["model.inner.L_level.layers.1.mlp_t.gate_up_proj.weight"].shape) == (5120, 916)
    assert tuple(sd["model.inner.L_level.layers.1.mlp_t.down_proj.weight"].shape) == (916, 2560)


def test_non_persistent_buffers_are_not_saved():
    model = build("sudoku")
    buffers = dict(model.named_buffers())
    for name in ("model.inner.puzzle_emb.local_weights", "model.inner.puzzle_emb.local_ids",
                 "model.inner.rotary_emb.cos_cached", "model.inner.rotary_emb.sin_cached"):
        assert name in buffers and name not in model.state_dict()
    assert tuple(buffers["model.inner.puzzle_emb.local_weights"].shape) == (768, D)
    assert buffers["model.inner.puzzle_emb.local_ids"].dtype == torch.int32
    assert tuple(buffers["model.inner.rotary_emb.cos_cached"].shape) == (81 + P, D // 8)
    assert buffers["model.inner.rotary_emb.cos_cached"].dtype == torch.float32


@pytest.mark.parametrize("task,mlp_t,count", [
    ("arc", False, 6_829_058),
    ("sudoku", False, 6_828_034),
    ("sudoku", True, 5_028_866),
    ("maze", False, 6_822_914),
])
def test_parameter_counts(task, mlp_t, count):
    model = build(task, mlp_t=mlp_t, pos_encodings="none" if mlp_t else "rope")
    assert sum(p.numel() for p in model.parameters()) == count  # the puzzle table is a buffer, not counted
    assert "model.inner.puzzle_emb.weights" not in dict(model.named_parameters())
