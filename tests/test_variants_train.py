"""Each of the four other architectures trains through pretrain.py on the CPU (the loss falls) and its
checkpoint evaluates through scripts/run_eval_only.py to the metrics of the run's final evaluation. HRM's
training step includes its target-Q pass (q_continue_loss is logged); EMA and gradient accumulation are
exercised on one variant each, exact resume on HRM."""

import os
import sys

import pytest

from tests.conftest import read_eval_report, run_eval_only_in_process
from test_pretrain import check_ok, checkpoints, pretrain, read_metrics

SMALL = ["arch.hidden_size=32", "arch.num_heads=2", "arch.expansion=2", "arch.halt_max_steps=2",
         "arch.halt_exploration_prob=0", "arch.puzzle_emb_ndim=32"]
VARIANTS = {
    "trm_singlez": ["arch.H_cycles=2", "arch.L_cycles=2", "arch.puzzle_emb_len=1"],
    "trm_hier6": ["arch.H_cycles=2", "arch.L_cycles=2", "arch.puzzle_emb_len=1", "ema=True"],
    "hrm": ["arch.H_cycles=2", "arch.L_cycles=2", "arch.H_layers=1", "arch.L_layers=1", "micro_batch_size=16"],
    "transformers_baseline": ["arch.H_layers=2"],
}
STEPS = 24  # 6 epochs of 128 puzzles in batches of 32


@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_variant_trains_and_its_checkpoint_evaluates(arch, sudoku_dataset, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    arch_args = [f"arch={arch}", *SMALL, *VARIANTS[arch]]
    check_ok(pretrain(sudoku_dataset, ckpt, "global_batch_size=32", "epochs=6", "eval_interval=6", "lr=3e-3",
                      "lr_warmup_steps=2", *arch_args))

    train, evals = read_metrics(ckpt)
    assert sorted(train) == list(range(1, STEPS + 1))
    first, last = train[1]["train/lm_loss"], sum(train[s]["train/lm_loss"] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < 0.7 * first, (first, last)
    # HRM learns its continue head in every training step; the others have no continue target.
    assert all(("train/q_continue_loss" in row) == (arch == "hrm") for row in train.values())

    [final] = checkpoints(ckpt)
    assert os.path.basename(final) == f"step_{STEPS}"
    outdir = tmp_path / "eval"
    rc, _, err = run_eval_only_in_process(["--checkpoint", final, "--dataset", sudoku_dataset, "--outdir", outdir,
                                           "--device", "cpu", "--global-batch-size", "32", *arch_args], capsys)
    assert rc == 0, err
    metrics = read_eval_report(outdir)["metrics"]["all"]
    for key in ("accuracy", "exact_accuracy", "lm_loss"):
        assert metrics[key] == pytest.approx(evals[STEPS][key], rel=1e-5, abs=1e-6), key


def test_hrm_sigterm_then_resume_is_exact(make_sudoku_dataset, tmp_path):
    # HRM's carry and its extra target-Q pass go through the training-state checkpoint like TRM's: a run stopped
    # by SIGTERM and resumed logs the same metrics and ends with the same weights as an uninterrupted one.
    import signal

    import torch

    from test_resume import interrupt, metrics, run, state_steps, train_lines

    data = make_sudoku_dataset(64, 16, 30)
    args = [f"data_paths=[{data}]", "evaluators=[]", "global_batch_size=8", "epochs=2", "eval_interval=1",
            "lr=1e-3", "lr_warmup_steps=2", "ema=True", "arch=hrm", *SMALL, "arch.H_layers=1", "arch.L_layers=1",
            "arch.halt_max_steps=3", "arch.halt_exploration_prob=0.5", "++device=cpu", "++metrics_jsonl=true"]
    command = lambda path, *extra: [sys.executable, "pretrain.py", *args, f"++checkpoint_path={path}", *extra]
    ref, path = str(tmp_path / "ref"), str(tmp_path / "run")
    run(command(ref))
    proc = interrupt(command(path), ready=lambda: train_lines(path) >= 4, sig=signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr_text[-3000:]
    (stopped_at,) = state_steps(path)
    assert 4 <= stopped_at < 16
    run(command(path, "++resume=true"))
    assert metrics(path) == metrics(ref)
    assert any("train/q_continue_loss" in row for row in metrics(ref))
    load = lambda d: torch.load(os.path.join(d, "step_16"), map_location="cpu", weights_only=True)
    a, b = load(path), load(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
