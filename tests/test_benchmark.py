"""scripts/benchmark.py: the CPU smoke run reports every field (and the --profile kernel tables), and its FLOP count matches what PyTorch's FLOP
counter sees in one ACT step (and the paper-size Sudoku step's ~36.6 TFLOP)."""

import json
import os
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))

import benchmark  # noqa: E402
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1, TRMConfig  # noqa: E402

TINY = ["global_batch_size=4", "arch.hidden_size=32", "arch.num_heads=2", "arch.L_layers=1", "arch.H_cycles=2",
        "arch.L_cycles=2", "arch.halt_max_steps=2", "arch.puzzle_emb_len=1", "arch.expansion=2"]


def paper_config(**kw):
    base = dict(batch_size=768, seq_len=81, puzzle_emb_ndim=512, num_puzzle_identifiers=1, vocab_size=11, H_cycles=3,
                L_cycles=6, H_layers=0, L_layers=2, hidden_size=512, expansion=4, num_heads=8, pos_encodings="rope",
                halt_max_steps=16, halt_exploration_prob=0.1, puzzle_emb_len=16)
    base.update(kw)
    return TRMConfig(**base)


def test_smoke_run_reports_every_field(tmp_path):
    out = tmp_path / "bench.json"
    result = benchmark.main(["--steps", "2", "--warmup", "1", "--eval-batches", "1", "--seq-len", "9",
                             "--vocab-size", "5", "--json-out", str(out), "--profile", "--profile-steps", "1", *TINY])
    assert json.loads(out.read_text()) == result
    for key in ("profile_train", "profile_eval"):  # the kernel tables, by self CPU time here
        table = result[key]
        assert "Self CPU" in table and "aten::mm" in table, table
        rows = [line for line in table.splitlines() if line.strip().startswith("aten::")]
        assert 0 < len(rows) <= 30
    assert "AdamATan2" in result["profile_train"] and "AdamATan2" not in result["profile_eval"]
    for key in ("train_ms_per_step", "examples_per_s", "warmup_s", "eval_puzzles_per_s", "eval_warmup_s"):
        assert result[key] > 0, key
    assert result["train_flop_per_step"] == benchmark.model_flops(paper_config(
        batch_size=4, seq_len=9, vocab_size=5, puzzle_emb_ndim=32, hidden_size=32, num_heads=2, L_layers=1,
        H_cycles=2, L_cycles=2, halt_max_steps=2, puzzle_emb_len=1, expansion=2))["train_step"] * 4
    assert result["train_peak_gpu_mem_gib"] is None and result["compiled"] is False  # CPU: no CUDA numbers
    assert 0 <= result["estimated_peak_gib"] < 0.1  # the memory estimate (MiBs here), beside the peak on CUDA


def test_paper_sudoku_step_flops():
    flops = benchmark.model_flops(paper_config())["train_step"] * 768
    assert flops / 1e12 == pytest.approx(36.6, abs=0.05)


@pytest.mark.parametrize("mlp_t", [False, True])
def test_forward_flops_match_pytorch_counter(mlp_t):
    cfg = dict(batch_size=3, seq_len=7, puzzle_emb_ndim=16, num_puzzle_identifiers=2, vocab_size=6, H_cycles=2,
               L_cycles=2, H_layers=0, L_layers=2, hidden_size=16, expansion=2, num_heads=2,
               pos_encodings="none" if mlp_t else "rope", halt_max_steps=2, halt_exploration_prob=0.0,
               puzzle_emb_len=1, forward_dtype="float32", mlp_t=mlp_t)
    model = TinyRecursiveReasoningModel_ACTV1(cfg).eval()
    batch = {"inputs": torch.randint(0, 6, (3, 7)), "labels": torch.randint(0, 6, (3, 7)),
             "puzzle_identifiers": torch.zeros(3, dtype=torch.int32)}
    carry = model.initial_carry(batch)
    # The math attention kernel is made of matrix products the counter sees (it skips CPU's fused kernel).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(carry, batch)
    assert counter.get_total_flops() == benchmark.model_flops(model.config)["act_step_forward"] * 3


@pytest.mark.parametrize("halt_bias, mean_steps", [(None, 2), (5.0, 1)])
def test_early_exit_reports_the_steps_rows_used(halt_bias, mean_steps):
    # The built model's head (bias -5) never says halt, so every row runs halt_max_steps (2 here); the measurement
    # knob makes every row halt at its first step, the streaming worst case.
    bias = [] if halt_bias is None else ["--eval-halt-bias", str(halt_bias)]
    result = benchmark.main(["--steps", "1", "--warmup", "0", "--eval-batches", "2", "--seq-len", "9",
                             "--vocab-size", "5", "--early-exit", *bias, *TINY])
    assert result["eval_early_exit"] is True and result["eval_halt_bias"] == halt_bias
    assert result["eval_mean_act_steps"] == mean_steps
    assert result["eval_row_steps_per_s"] == pytest.approx(result["eval_puzzles_per_s"] * mean_steps, rel=1e-3)
