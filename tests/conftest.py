"""Shared pytest set-up: one thread per process (the CI machine has 2 cores; oversubscribed threads make the tests
many times slower), W&B off, and small datasets built once per session by the project's own builders."""

import os
import subprocess
import sys

# Before torch is imported anywhere: subprocesses inherit these too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def make_sudoku_dataset(tmp_path_factory):
    """Factory: `make_sudoku_dataset(num_train, num_test, min_blanks, max_blanks=None)` -> path of a Sudoku dataset
    folder (train/ and test/) written by dataset.generate_sudoku + dataset/build_sudoku_dataset.py (seed 0).
    Each distinct recipe is built once per session."""
    built = {}

    def make(num_train: int, num_test: int, min_blanks: int, max_blanks: int = None) -> str:
        key = (num_train, num_test, min_blanks, max_blanks if max_blanks is not None else min_blanks)
        if key not in built:
            root = tmp_path_factory.mktemp("sudoku_{}_{}_{}_{}".format(*key))
            src, out = root / "src", root / "data"
            for cmd in (
                [sys.executable, "-m", "dataset.generate_sudoku", "--output-dir", str(src), "--num-train", str(key[0]),
                 "--num-test", str(key[1]), "--min-blanks", str(key[2]), "--max-blanks", str(key[3]), "--seed", "0"],
                [sys.executable, "dataset/build_sudoku_dataset.py", "--source-dir", str(src), "--output-dir", str(out),
                 "--seed", "0"],
            ):
                result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
                assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}"
            built[key] = str(out)
        return built[key]

    return make


@pytest.fixture(scope="session")
def sudoku_dataset(make_sudoku_dataset):
    """A small Sudoku dataset: 128 train and 32 test puzzles with 0-2 blanks each (not augmented)."""
    return make_sudoku_dataset(128, 32, 0, 2)


# A tiny TRM, trained for a few steps by pretrain.py, evaluated by scripts/run_eval_only.py: the checkpoints that
# the visualizer, server and page tests run on.
TINY_TRAINED_ARCH = ["arch.hidden_size=32", "arch.num_heads=2", "arch.expansion=2", "arch.H_cycles=2",
                     "arch.L_cycles=2", "arch.halt_max_steps=3", "arch.halt_exploration_prob=0",
                     "arch.puzzle_emb_ndim=0", "arch.puzzle_emb_len=0"]


def _train_and_evaluate(root, data, batch: int, epochs: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    ckpt, outdir = root / "ckpt", root / "eval"
    steps = []
    for cmd in (
        [sys.executable, "pretrain.py", f"data_paths=[{data}]", "evaluators=[]", f"+checkpoint_path={ckpt}",
         f"global_batch_size={batch}", f"epochs={epochs}", f"eval_interval={epochs}", "lr=3e-3", "lr_warmup_steps=2",
         "metrics_jsonl=True", *TINY_TRAINED_ARCH],
        None,
    ):
        if cmd is None:
            steps = sorted((n for n in os.listdir(ckpt) if n.startswith("step_") and n[5:].isdigit()),
                           key=lambda n: int(n[5:]))
            cmd = [sys.executable, "scripts/run_eval_only.py", "--checkpoint", str(ckpt / steps[-1]), "--dataset", data,
                   "--outdir", str(outdir), "--device", "cpu", "--global-batch-size", str(batch),
                   "--record-puzzles", "0-3", *TINY_TRAINED_ARCH]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}"
    return {"checkpoint": str(ckpt / steps[-1]), "checkpoint_dir": str(ckpt), "dataset": data, "outdir": str(outdir),
            "overrides": list(TINY_TRAINED_ARCH)}


@pytest.fixture(scope="session")
def trained_sudoku(sudoku_dataset, tmp_path_factory):
    """{checkpoint, checkpoint_dir, dataset, outdir (the runner's outputs), overrides} of a tiny Sudoku TRM."""
    return _train_and_evaluate(tmp_path_factory.mktemp("trained_sudoku"), sudoku_dataset, batch=32, epochs=2)


@pytest.fixture(scope="session")
def maze_dataset(tmp_path_factory):
    """20 + 20 real 30x30 mazes (tests/fixtures/maze_small) through dataset/build_maze_dataset.py."""
    out = tmp_path_factory.mktemp("maze_dataset") / "data"
    cmd = [sys.executable, "dataset/build_maze_dataset.py", "--source-dir", "tests/fixtures/maze_small",
           "--output-dir", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return str(out)


@pytest.fixture(scope="session")
def trained_maze(maze_dataset, tmp_path_factory):
    return _train_and_evaluate(tmp_path_factory.mktemp("trained_maze"), maze_dataset, batch=4, epochs=2)
