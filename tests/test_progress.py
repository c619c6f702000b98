"""What training shows on the console (training/progress.py, issue 10 item 9): the bar's total is the number of
optimizer steps the run takes, its accuracies are those of the puzzles that halted in the last steps (not 0 on the
steps where none halted), and evaluations print one readable line per set. The logged metrics are unchanged."""

import json
import os
import re

import pytest

from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from test_pretrain import check_ok, checkpoints, pretrain, read_metrics
from training import progress

TINY = ["arch.hidden_size=32", "arch.num_heads=2", "arch.expansion=2", "arch.H_cycles=1", "arch.L_cycles=1",
        "arch.L_layers=1", "arch.halt_max_steps=2", "arch.halt_exploration_prob=0", "arch.puzzle_emb_ndim=0",
        "arch.puzzle_emb_len=0"]


def bar_states(stderr: str):
    """(done, total, postfix) of every state the training bar drew."""
    states = []
    for segment in re.split(r"[\r\n]", stderr):
        match = re.match(r"\s*train:.*?\|\s*(\d+)/(\d+) \[[^\]]*?(?:, (.*))?\]\s*$", segment)
        if match:
            states.append((int(match.group(1)), int(match.group(2)), match.group(3) or ""))
    return states


def test_bar_counts_the_steps_taken_and_evaluations_read_as_lines(sudoku_dataset, tmp_path):
    # 128 one-example puzzles, 2 epochs per pass, G=48: each pass yields 5 full batches (256 rows, the last 16 are
    # dropped), so 4 passes take 20 steps while the estimate int(8 * 128 / 48) is 21.
    ckpt = tmp_path / "ckpt"
    result = pretrain(sudoku_dataset, ckpt, "global_batch_size=48", "epochs=8", "eval_interval=2", "lr=1e-3",
                      "lr_warmup_steps=1", *TINY)
    check_ok(result)
    train, evals = read_metrics(ckpt)
    assert sorted(train) == list(range(1, 21)) and sorted(evals) == [5, 10, 15, 20]
    assert os.path.basename(checkpoints(ckpt)[-1]) == "step_20"

    states = bar_states(result.stderr)
    assert states and {total for _, total, _ in states} == {20}, states[:3]
    assert states[-1][:2] == (20, 20)
    # Rows halt together every 2nd step here (no exploration): the bar still shows the recent puzzles' accuracy.
    for done, _, postfix in states:
        if done >= 2:
            shown = dict(re.findall(r"(\w+)=([^,]+)", postfix))
            assert set(shown) == {"loss", "token_acc", "exact_acc"}, postfix
            assert re.fullmatch(r"\d+\.\d%", shown["token_acc"]) and float(shown["token_acc"][:-1]) > 0, postfix
    assert progress.LEGEND in result.stdout + result.stderr

    eval_lines = [line for line in result.stdout.splitlines() if re.match(r"step \d+ eval", line)]
    assert [line.split()[1] for line in eval_lines] == ["5", "10", "15", "20"]
    for line in eval_lines:
        assert "{" not in line and re.search(r"eval all: accuracy \d+\.\d\d% \(of labelled tokens\), "
                                             r"exact_accuracy \d+\.\d\d% \(of puzzles\)", line), line
    last = evals[20]
    assert f"accuracy {last['accuracy']:.2%} (of labelled tokens)" in eval_lines[-1]
    # The logged names are unchanged.
    assert set(train[20]) >= {"train/accuracy", "train/exact_accuracy", "train/lm_loss", "train/count", "train/lr"}


def test_bar_weights_accuracies_by_the_halted_rows(capsys):
    bar = progress.TrainProgress(total=4)

    def step(loss, halted, accuracy, exact):
        bar.update({"train/lm_loss": loss, "train/accuracy": accuracy, "train/exact_accuracy": exact}, halted)
        return dict(re.findall(r"(\w+)=([^,]+)", bar.bar.postfix))

    assert step(2.0, 0, 0.0, 0.0) == {"loss": "2.000", "token_acc": "-", "exact_acc": "-"}  # nothing halted yet
    assert step(1.0, 64, 0.5, 0.25) == {"loss": "1.500", "token_acc": "50.0%", "exact_acc": "25.0%"}
    assert step(1.0, 0, 0.0, 0.0)["token_acc"] == "50.0%"  # a step where no row halted changes nothing
    assert step(1.0, 32, 0.8, 0.5) == {"loss": "1.250", "token_acc": "60.0%", "exact_acc": "33.3%"}
    bar.close()


def test_eval_lines():
    metrics = {"all": {"accuracy": 0.8961, "exact_accuracy": 0.4, "lm_loss": 0.3212, "steps": 16.0},
               "ARC/pass@1": 0.25, "ARC/example_N": 400.0}
    assert progress.format_eval(7, metrics) == [
        "step 7 eval all: accuracy 89.61% (of labelled tokens), exact_accuracy 40.00% (of puzzles), lm_loss 0.3212, "
        "steps 16",
        "step 7 eval: ARC/pass@1 25.00%, ARC/example_N 400",
    ]
    assert progress.format_eval(7, None) == []


@pytest.mark.parametrize("epochs_per_pass, passes, total_steps, expected", [
    (2, 4, 21, 20),  # 5 batches per pass; the estimate is one more
    (2, 4, 18, 18),  # the loader yields more than the estimate: the run stops at total_steps
])
def test_steps_to_run(sudoku_dataset, epochs_per_pass, passes, total_steps, expected):
    dataset = PuzzleDataset(PuzzleDatasetConfig(seed=0, dataset_paths=[sudoku_dataset], global_batch_size=48,
                                                test_set_mode=False, epochs_per_iter=epochs_per_pass, rank=0,
                                                num_replicas=1))
    assert progress.steps_to_run(dataset, passes, total_steps) == expected
    with open(os.path.join(sudoku_dataset, "train", "dataset.json")) as f:
        assert json.load(f)["total_groups"] == 128
