"""Per-step recording (inference/recording.py) and the runner's browser JSON: every ACT step of chosen puzzles with
sigmoid(q_halt), the final step equal to what the runner saves, and the grid conversions the pages and the server
rely on (tokens <-> display values, with their validation)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataset.common import PuzzleDatasetMetadata
from inference import recording
from tests.conftest import REPO


def metadata(vocab, seq_len, ids=1):
    return PuzzleDatasetMetadata(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=vocab, seq_len=seq_len,
                                 num_puzzle_identifiers=ids, total_groups=1, mean_puzzle_examples=1.0, total_puzzles=1,
                                 sets=["all"])


SUDOKU, MAZE, ARC = metadata(11, 81), metadata(6, 900), metadata(12, 900, ids=5)


@pytest.mark.parametrize("run", ["trained_sudoku", "trained_maze"])
def test_runner_json_holds_every_step_and_matches_saved_predictions(run, request):
    info = request.getfixturevalue(run)
    with open(os.path.join(info["outdir"], recording.VISUALIZER_JSON)) as f:
        doc = json.load(f)
    kind = "sudoku" if run == "trained_sudoku" else "maze"
    side = 9 if kind == "sudoku" else 30
    assert doc["format"] == recording.JSON_FORMAT and doc["task"] == kind and doc["grid_size"] == [side, side]
    assert [e["index"] for e in doc["examples"]] == [0, 1, 2, 3]  # --record-puzzles 0-3

    saved = torch.load(os.path.join(info["outdir"], "step_0_all_preds.0"), weights_only=True)
    raw_inputs = np.load(os.path.join(info["dataset"], "test", "all__inputs.npy"))
    raw_labels = np.load(os.path.join(info["dataset"], "test", "all__labels.npy"))
    for example in doc["examples"]:
        i = example["index"]
        assert len(example["steps"]) == 3  # arch.halt_max_steps=3: one entry per ACT step
        assert [s["step"] for s in example["steps"]] == [1, 2, 3]
        assert all(0.0 < s["q_halt"] < 1.0 for s in example["steps"])
        # The last step is the runner's saved prediction for that row, decoded.
        assert example["prediction_tokens"] == saved["preds"][i].tolist()
        assert example["prediction"] == example["steps"][-1]["prediction"]
        assert example["prediction"] == recording.tokens_to_grid(kind, saved["preds"][i].numpy())
        assert example["input"] == recording.tokens_to_grid(kind, raw_inputs[i])
        assert example["label"] == recording.tokens_to_grid(kind, raw_labels[i])
        assert example["correct"] == bool((saved["preds"][i].numpy() == raw_labels[i]).all())
        assert np.array(example["input"]).shape == (side, side)


def test_trace_q_halt_is_sigmoid_of_logits_and_steps_change(trained_sudoku):
    from inference.serving import load_for_inference

    loaded = load_for_inference(trained_sudoku["checkpoint"], trained_sudoku["dataset"], trained_sudoku["overrides"],
                                device="cpu")
    split = recording.TestSplit(trained_sudoku["dataset"], loaded.metadata)
    batch = recording.make_batch(np.stack([split.inputs[0], split.inputs[1]]), None, np.array([0, 0]),
                                 loaded.metadata, torch.device("cpu"))
    trace = recording.trace_act_steps(loaded.model, batch)
    assert trace["preds"].shape == (3, 2, 81) and trace["q_halt"].shape == (3, 2)
    assert torch.allclose(trace["q_halt"], torch.sigmoid(trace["q_halt_logits"]))
    assert not torch.equal(trace["q_halt_logits"][0], trace["q_halt_logits"][-1])  # the state evolves per step


def test_grid_round_trips():
    digits = [[(r * 3 + r // 3 + c) % 9 + 1 for c in range(9)] for r in range(9)]
    digits[0][0] = 0
    tokens = recording.grid_to_tokens("sudoku", digits, SUDOKU)
    assert tokens[0] == 1 and tokens[1] == digits[0][1] + 1
    assert recording.tokens_to_grid("sudoku", tokens) == digits

    maze = [[2] * 30 for _ in range(30)]
    maze[0][0], maze[29][29], maze[5][5] = 3, 4, 1
    assert recording.tokens_to_grid("maze", recording.grid_to_tokens("maze", maze, MAZE)) == maze

    arc = [[1, 2, 3], [4, 5, 0]]
    tokens = recording.grid_to_tokens("arc", arc, ARC).reshape(30, 30)
    assert tokens[0, :4].tolist() == [3, 4, 5, 1] and tokens[2, :4].tolist() == [1, 1, 1, 0]
    assert recording.tokens_to_grid("arc", tokens.reshape(-1)) == arc
    full = [[7] * 30 for _ in range(30)]  # a 30x30 ARC grid has no rails
    assert recording.tokens_to_grid("arc", recording.grid_to_tokens("arc", full, ARC)) == full


@pytest.mark.parametrize("kind,grid,fragment", [
    ("sudoku", [[0] * 9] * 8, "must be 9x9"),
    ("sudoku", [[10] * 9] * 9, "digits 0..9"),
    ("sudoku", [[0] * 9] * 8 + [[0] * 8], "same, non-zero length"),
    ("sudoku", [["1"] * 9] * 9, "integers only"),
    ("sudoku", "123", "list of rows"),
    ("maze", [[2] * 29] * 30, "must be 30x30"),
    ("maze", [[5] * 30] * 30, "1 (wall)"),
    ("arc", [[0] * 31] * 2, "at most 30x30"),
    ("arc", [[-1]], "colours 0..9"),
])
def test_bad_grids_are_refused(kind, grid, fragment):
    meta = {"sudoku": SUDOKU, "maze": MAZE, "arc": ARC}[kind]
    with pytest.raises(recording.GridError, match=re.escape(fragment)):
        recording.grid_to_tokens(kind, grid, meta)


def test_task_kind_and_row_lists():
    assert [recording.task_kind(m) for m in (SUDOKU, MAZE, ARC)] == ["sudoku", "maze", "arc"]
    with pytest.raises(recording.GridError, match="none of"):
        recording.task_kind(metadata(7, 49))
    assert recording.parse_rows("0,3,5-7") == [0, 3, 5, 6, 7] and recording.parse_rows("none") == []
    with pytest.raises(recording.GridError, match="like '0,3,5-7'"):
        recording.parse_rows("a-b")


def test_runner_refuses_an_out_of_range_puzzle(trained_sudoku, tmp_path):
    cmd = [sys.executable, "scripts/run_eval_only.py", "--checkpoint", trained_sudoku["checkpoint"], "--dataset",
           trained_sudoku["dataset"], "--outdir", str(tmp_path), "--device", "cpu", "--global-batch-size", "32",
           "--record-puzzles", "0,99", *trained_sudoku["overrides"]]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --record-puzzles 99 is out of range: the test split has 32 examples (0..31)"]


def test_runner_records_nothing_with_none(trained_sudoku, tmp_path):
    cmd = [sys.executable, "scripts/run_eval_only.py", "--checkpoint", trained_sudoku["checkpoint"], "--dataset",
           trained_sudoku["dataset"], "--outdir", str(tmp_path), "--device", "cpu", "--global-batch-size", "32",
           "--record-puzzles", "none", *trained_sudoku["overrides"]]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "eval_report.json").is_file() and not (tmp_path / recording.VISUALIZER_JSON).exists()
    assert "Visualizer:" not in result.stdout
