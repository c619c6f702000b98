"""When the loader yields more batches than total_steps (the step count is estimated from the dataset's mean
puzzle size; ARC's group-weighted sampling can yield more), the surplus batches are not trained on, the run
ends with its final evaluation and checkpoint, and that checkpoint is named after the optimizer steps taken."""

import json
import os
import shutil

from test_pretrain import check_ok, checkpoints, pretrain, read_metrics

TINY = ["arch.hidden_size=32", "arch.num_heads=2", "arch.expansion=2", "arch.H_cycles=1", "arch.L_cycles=1",
        "arch.L_layers=1", "arch.halt_max_steps=2", "arch.halt_exploration_prob=0", "arch.puzzle_emb_ndim=0",
        "arch.puzzle_emb_len=0"]


def test_final_checkpoint_is_named_after_the_optimizer_steps(sudoku_dataset, tmp_path):
    # 128 puzzles of one example each, but dataset.json claims 0.5 examples per puzzle: the estimate is half
    # of what the loader yields. 4 epochs in 2 iterations of 2 epochs (8 batches each): total_steps =
    # int(4 * 128 * 0.5 / 32) = 8, all taken in the first iteration; the loader would yield 16.
    data = tmp_path / "data"
    shutil.copytree(sudoku_dataset, data)
    meta_path = data / "train" / "dataset.json"
    with open(meta_path) as f:
        meta = json.load(f)
    meta["mean_puzzle_examples"] = 0.5
    with open(meta_path, "w") as f:
        json.dump(meta, f)

    ckpt = tmp_path / "ckpt"
    check_ok(pretrain(data, ckpt, "global_batch_size=32", "epochs=4", "eval_interval=2", "lr=1e-3",
                      "lr_warmup_steps=1", "checkpoint_every_eval=True", *TINY))
    train, evals = read_metrics(ckpt)
    assert sorted(train) == list(range(1, 9))  # one logged optimizer step per trained batch
    assert list(evals) == [8]  # one final evaluation, no repeats of it for the untrained iteration
    assert [os.path.basename(p) for p in checkpoints(ckpt)] == ["step_8"]
    assert os.listdir(ckpt / "train_state") == ["step_8"]
