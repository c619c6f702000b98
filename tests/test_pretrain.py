"""pretrain.py end to end on the CPU, as subprocesses run from the repo root:

- a tiny TRM learns a small generated Sudoku set (train loss falls, exact accuracy rises), writes step_<N> and
  all_config.yaml, and the checkpoint evaluates with scripts/run_eval_only.py to the same accuracy;
- torchrun with 2 gloo processes trains the same steps as one process with the same global batch;
- micro_batch_size (gradient accumulation) trains the same steps as the full batch;
- a bad config fails at start with one `error:` line and a non-zero exit (checked in process, and once as a
  real command).

Metrics are read from <checkpoint_path>/metrics.jsonl (`metrics_jsonl=True`)."""

import json
import os
import re
import subprocess

import pytest
import torch
import yaml

from tests.conftest import (ENV, REPO, launch, one_error_line, read_eval_report, run_eval_only_in_process,
                            run_pretrain_in_process)


# A tiny TRM: 2 H-cycles x 2 L-cycles of a 2-layer, 32-wide network, 2 ACT steps, no exploration draws (so ranks
# draw nothing of their own).
TINY_ARCH = ["arch.hidden_size=32", "arch.num_heads=2", "arch.expansion=2", "arch.H_cycles=2", "arch.L_cycles=2",
             "arch.halt_max_steps=2", "arch.halt_exploration_prob=0"]
NO_PUZZLE_EMB = ["arch.puzzle_emb_ndim=0", "arch.puzzle_emb_len=0"]
SMALL_PUZZLE_EMB = ["arch.puzzle_emb_ndim=32", "arch.puzzle_emb_len=1"]  # exercises sign-SGD on the sparse table
def arguments(data, checkpoint_path, *overrides):
    return [f"data_paths=[{data}]", "evaluators=[]", f"+checkpoint_path={checkpoint_path}", "metrics_jsonl=True",
            *overrides]


def pretrain(data, checkpoint_path, *overrides, torchrun=False, timeout=300):
    cmd = launch("pretrain.py", nproc=2 if torchrun else 1) + arguments(data, checkpoint_path, *overrides)
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def check_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"


def read_metrics(checkpoint_path):
    """(train metrics by step, eval metrics by step) from metrics.jsonl."""
    train, evals = {}, {}
    with open(os.path.join(checkpoint_path, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/lm_loss" in row:
                assert row["step"] not in train, f"step {row['step']} logged twice"
                train[row["step"]] = row
            elif "all" in row:
                evals[row["step"]] = row["all"]
    return train, evals


def checkpoints(checkpoint_path):
    """The step_<N> weight files, by step."""
    names = [n for n in os.listdir(checkpoint_path) if re.fullmatch(r"step_\d+", n)]
    return [os.path.join(checkpoint_path, n) for n in sorted(names, key=lambda n: int(n[5:]))]


# ----------------------------------------------------------------------------------------------------------------
# 1. Learning, checkpoint files, eval-only runner

def test_tiny_trm_learns_sudoku_and_checkpoint_evaluates(make_sudoku_dataset, tmp_path, capsys):
    # 0-2 blanks: a third of the boards need only copying, so exact accuracy can rise within ~125 CPU steps;
    # from random init it starts at 0 (every one of the 81 cells must be right).
    data = make_sudoku_dataset(1000, 200, 0, 2)
    ckpt = tmp_path / "ckpt"
    arch = TINY_ARCH + NO_PUZZLE_EMB
    result = pretrain(data, ckpt, "global_batch_size=32", "epochs=4", "eval_interval=4", "lr=3e-3",
                      "lr_warmup_steps=10", *arch)
    check_ok(result)

    # Files: the final checkpoint and the composed config.
    steps = checkpoints(ckpt)
    total_steps = int(4 * 1000 / 32)
    assert [os.path.basename(p) for p in steps] == [f"step_{total_steps}"]
    with open(ckpt / "all_config.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["global_batch_size"] == 32 and saved["data_paths"] == [data]
    assert saved["arch"]["hidden_size"] == 32 and saved["checkpoint_path"] == str(ckpt)

    # Learning: the train loss falls by a clear factor, token and exact accuracy rise.
    train, evals = read_metrics(ckpt)
    assert sorted(train) == list(range(1, total_steps + 1))
    halted = [train[s] for s in sorted(train) if train[s]["train/count"] > 0]  # accuracies are over halted rows
    first_loss = train[1]["train/lm_loss"]
    last_loss = sum(train[s]["train/lm_loss"] for s in range(total_steps - 9, total_steps + 1)) / 10
    assert last_loss < first_loss / 3, (first_loss, last_loss)
    initial_exact = halted[0]["train/exact_accuracy"]
    assert halted[0]["train/accuracy"] < 0.5
    assert sum(r["train/accuracy"] for r in halted[-5:]) / 5 > 0.9
    assert sum(r["train/exact_accuracy"] for r in halted[-5:]) / 5 > initial_exact + 0.1

    # The evaluation at the end of training (test split).
    assert list(evals) == [total_steps]
    final_exact = evals[total_steps]["exact_accuracy"]
    assert final_exact > initial_exact + 0.15 and final_exact > 0.2, evals

    # The checkpoint through the eval-only runner: same weights, same data, same batch -> same metrics.
    outdir = tmp_path / "eval"
    rc, _, err = run_eval_only_in_process(["--checkpoint", steps[-1], "--dataset", data, "--outdir", outdir,
                                           "--device", "cpu", "--global-batch-size", "32", *arch], capsys)
    assert rc == 0, err
    report = read_eval_report(outdir)
    metrics = report["metrics"]["all"]
    assert metrics["exact_accuracy"] == pytest.approx(final_exact, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(evals[total_steps]["accuracy"], abs=1e-6)
    assert report["counts"]["all"]["count"] == 200


# ----------------------------------------------------------------------------------------------------------------
# 2 and 4. Same global batch, split differently: over 2 processes, or in micro-batches

SHORT_RUN = ["global_batch_size=32", "epochs=1", "eval_interval=1", "lr=3e-3", "lr_warmup_steps=2",
             *TINY_ARCH, *SMALL_PUZZLE_EMB]


@pytest.fixture(scope="module")
def single_process_run(sudoku_dataset, tmp_path_factory):
    """4 steps (128 puzzles / 32) in one process: the reference for the split runs."""
    ckpt = tmp_path_factory.mktemp("single") / "ckpt"
    check_ok(pretrain(sudoku_dataset, ckpt, *SHORT_RUN))
    return ckpt


def assert_same_training(reference, other):
    ref_train, ref_evals = read_metrics(reference)
    train, evals = read_metrics(other)
    assert sorted(train) == sorted(ref_train) == [1, 2, 3, 4]
    # First step: the same weights (rank 0's, broadcast) on the same 32 rows -> the same loss and metrics.
    for key, value in ref_train[1].items():
        assert train[1][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    # Later steps follow updates from the summed gradients (dense all-reduce, sparse-table all-gather).
    for step in (2, 3, 4):
        for key, value in ref_train[step].items():
            assert train[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    assert list(evals) == list(ref_evals) == [4]
    for key, value in ref_evals[4].items():
        assert evals[4][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # The final weights.
    [ref_file], [file] = checkpoints(reference), checkpoints(other)
    assert os.path.basename(file) == os.path.basename(ref_file) == "step_4"
    ref_state = torch.load(ref_file, map_location="cpu", weights_only=True)
    state = torch.load(file, map_location="cpu", weights_only=True)
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-5, msg=key)


def test_torchrun_two_processes_match_one(sudoku_dataset, single_process_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    check_ok(pretrain(sudoku_dataset, ckpt, *SHORT_RUN, torchrun=True))
    assert os.path.isfile(ckpt / "all_config.yaml")
    assert_same_training(single_process_run, ckpt)


def test_micro_batches_match_full_batch(sudoku_dataset, single_process_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    check_ok(pretrain(sudoku_dataset, ckpt, *SHORT_RUN, "micro_batch_size=8"))  # 4 micro-batches of 8 rows
    assert_same_training(single_process_run, ckpt)


# ----------------------------------------------------------------------------------------------------------------
# 3. Bad configs fail at start, in one line

def assert_one_error_line(result, fragment):
    assert result.returncode != 0, result.stderr
    one_error_line(result.stderr, fragment)


@pytest.mark.parametrize("overrides, fragment", [
    (["+foo=1"], "unknown config key 'foo'"),
    (["+arch.foo=1"], "unknown arch field 'arch.foo'"),
    (["epochs=3", "eval_interval=2"], "epochs=3 must be a multiple of eval_interval=2"),
    (["global_batch_size=abc"], "global_batch_size"),
], ids=["unknown-key", "unknown-arch-field", "epochs-vs-eval-interval", "not-an-int"])
def test_bad_config_fails_in_one_line(sudoku_dataset, tmp_path, capsys, overrides, fragment):
    ckpt = tmp_path / "ckpt"
    rc, _, err = run_pretrain_in_process(arguments(sudoku_dataset, ckpt, "global_batch_size=32", "epochs=2",
                                                   "eval_interval=2", *TINY_ARCH, *overrides), capsys)
    assert rc != 0, err
    one_error_line(err, fragment)
    assert not ckpt.exists()  # failed before writing anything


def test_missing_data_path_fails_in_one_line(tmp_path):
    missing = tmp_path / "no_such_dataset"
    ckpt = tmp_path / "ckpt"
    result = pretrain(missing, ckpt, "global_batch_size=32", "epochs=2", "eval_interval=2", *TINY_ARCH, timeout=120)
    assert_one_error_line(result, str(missing))
    assert not ckpt.exists()

# Under torchrun: tests/test_config_errors.py (the error printed once, no traceback, nothing written).
