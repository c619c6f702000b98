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
