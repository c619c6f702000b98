"""dataset/build_sudoku_dataset.py on a small CSV written by the offline generator: validity of every augmented
board, the on-disk format, seeding, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dataset import build_sudoku_dataset as builder
from dataset.common import write_source_csv
from dataset.generate_sudoku import generate
from tests.conftest import REPO, load_split, one_error_line

NUM_TRAIN, NUM_TEST = 12, 5


def write_rows(path, rows):
    with open(path, "w") as f:
        f.write("source,question,answer,rating\n")
        f.writelines(f"{s},{q},{a},{r}\n" for s, q, a, r in rows)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """train.csv / test.csv with ratings 0..3 in turn, so --min-difficulty has something to filter."""
    root = tmp_path_factory.mktemp("sudoku_src")
    puzzles = generate(NUM_TRAIN + NUM_TEST, 35, 50, 0, seed=3, workers=1, progress=False)
    rerated = [(q, a, i % 4) for i, (q, a, _) in enumerate(puzzles)]
    write_source_csv(str(root / "train.csv"), rerated[:NUM_TRAIN])
    write_source_csv(str(root / "test.csv"), rerated[NUM_TRAIN:])
    return root


def build(source_dir, output_dir, *flags):
    builder.main(builder.parse_args(["--source-dir", str(source_dir), "--output-dir", str(output_dir), *flags]))


def csv_digits(path):
    rows = [line.rstrip("\n").split(",") for line in open(path)][1:]
    q = np.array([[0 if c == "." else int(c) for c in r[1]] for r in rows], dtype=np.uint8)
    a = np.array([[int(c) for c in r[2]] for r in rows], dtype=np.uint8)
    return q, a, [int(r[3]) for r in rows]


def is_valid_solution(grid):  # grid: [81] digits
    g = np.asarray(grid).reshape(9, 9)
    boxes = g.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)
    return all(sorted(line) == list(range(1, 10)) for lines in (g, g.T, boxes) for line in lines)


@pytest.fixture(scope="module")
def augmented(source_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "sudoku"
    build(source_dir, out, "--subsample-size", "8", "--num-aug", "20", "--seed", "5")
    return out


def test_augmented_train_split(source_dir, augmented):
    meta, arr = load_split(augmented, "train")
    assert meta == {"pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": 11, "seq_len": 81,
                    "num_puzzle_identifiers": 1, "total_groups": 8, "mean_puzzle_examples": 1.0,
                    "total_puzzles": 8, "sets": ["all"]}
    assert arr["inputs"].dtype == arr["labels"].dtype == np.uint8  # docs/compatibility.md section 12, item 10
    assert arr["inputs"].shape == arr["labels"].shape == (8 * 21, 81)
    np.testing.assert_array_equal(arr["group_indices"], np.arange(0, 8 * 21 + 1, 21))
    np.testing.assert_array_equal(arr["puzzle_indices"], np.arange(8 * 21 + 1))
    np.testing.assert_array_equal(arr["puzzle_identifiers"], np.zeros(8 * 21))
    assert all(a.dtype == np.int32 for k, a in arr.items() if k not in ("inputs", "labels"))
    with open(os.path.join(augmented, "identifiers.json")) as f:
        assert json.load(f) == ["<blank>"]

    questions, answers, _ = csv_digits(source_dir / "train.csv")
    inputs, labels = arr["inputs"].astype(int) - 1, arr["labels"].astype(int) - 1  # back to digits, 0 = blank
    originals = set()
    for g in range(8):
        group_in, group_lab = inputs[21 * g: 21 * (g + 1)], labels[21 * g: 21 * (g + 1)]
        # Version 0 is a distinct row of the CSV, unchanged.
        (row,) = np.flatnonzero((questions == group_in[0]).all(axis=1) & (answers == group_lab[0]).all(axis=1))
        originals.add(row)
        for board, solution in zip(group_in, group_lab):
            assert is_valid_solution(solution)
            givens = board != 0
            np.testing.assert_array_equal(board[givens], solution[givens])
            assert givens.sum() == (group_in[0] != 0).sum()
        assert len({b.tobytes() for b in group_in}) > 15  # the copies really are shuffled
    assert len(originals) == 8


def test_test_split_unaugmented(source_dir, augmented):
    meta, arr = load_split(augmented, "test")
    assert (meta["total_groups"], meta["total_puzzles"], meta["vocab_size"]) == (NUM_TEST, NUM_TEST, 11)
    questions, answers, _ = csv_digits(source_dir / "test.csv")
    np.testing.assert_array_equal(arr["inputs"], questions + 1)
    np.testing.assert_array_equal(arr["labels"], answers + 1)
    assert arr["inputs"].dtype == np.uint8
    np.testing.assert_array_equal(arr["group_indices"], np.arange(NUM_TEST + 1))


def test_seed_determines_output(source_dir, augmented, tmp_path):
    build(source_dir, tmp_path / "same", "--subsample-size", "8", "--num-aug", "20", "--seed", "5")
    build(source_dir, tmp_path / "other", "--subsample-size", "8", "--num-aug", "20", "--seed", "6")
    for split in ("train", "test"):
        for name in os.listdir(augmented / split):
            same = (augmented / split / name).read_bytes() == (tmp_path / "same" / split / name).read_bytes()
            assert same, f"{split}/{name} differs between two builds with the same seed"
    other = tmp_path / "other" / "train" / "all__inputs.npy"
    assert other.read_bytes() != (augmented / "train" / "all__inputs.npy").read_bytes()


def test_min_difficulty_filters_both_splits(source_dir, tmp_path):
    build(source_dir, tmp_path / "hard", "--min-difficulty", "2")
    for split in ("train", "test"):
        questions, _, ratings = csv_digits(source_dir / f"{split}.csv")
        _, arr = load_split(tmp_path / "hard", split)
        np.testing.assert_array_equal(arr["inputs"], questions[np.array(ratings) >= 2] + 1)


def test_shuffle_keeps_boards_valid():
    rng = np.random.default_rng(0)
    solution = np.array([int(c) for c in "534678912672195348198342567859761423426853791713924856961537284287419635345286179"],
                        dtype=np.uint8)
    board = np.where(rng.random(81) < 0.5, 0, solution).astype(np.uint8)
    boards, solutions = builder.shuffle_sudoku(np.tile(board, (500, 1)), np.tile(solution, (500, 1)), rng)
    for b, s in zip(boards, solutions):
        assert is_valid_solution(s)
        np.testing.assert_array_equal(b[b != 0], s[b != 0])
        assert (b == 0).sum() == (board == 0).sum()


def run_builder(*flags, env=None):
    """Run the builder as a script, the way the README recipes do."""
    return subprocess.run([sys.executable, "dataset/build_sudoku_dataset.py", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def assert_one_line_failure(result, *fragments):
    assert result.returncode == 1, result.stderr
    one_error_line(result.stderr, *fragments)


@pytest.mark.parametrize("column, value, problem", [
    ("question", "." * 80, "80 characters"),
    ("question", "." * 80 + "x", "'x'"),
    ("answer", "1" * 80 + "0", "'0'"),
], ids=["wrong-length", "bad-char", "blank-in-answer"])
def test_bad_row(source_dir, tmp_path, column, value, problem):
    src = tmp_path / "src"
    src.mkdir()
    (src / "test.csv").write_bytes((source_dir / "test.csv").read_bytes())
    _, q, a, _ = open(source_dir / "train.csv").read().splitlines()[1].split(",")
    row = ("x", value, a, 0) if column == "question" else ("x", q, value, 0)
    write_rows(src / "train.csv", [("x", q, a, 0), row])
    result = run_builder("--source-dir", str(src), "--output-dir", str(tmp_path / "out"))
    assert_one_line_failure(result, "train.csv line 3", column, problem)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no output and no temporary folder left behind


def test_missing_inputs(source_dir, tmp_path):
    result = run_builder("--source-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out"))
    assert_one_line_failure(result, "nowhere", "not found")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train.csv").write_bytes((source_dir / "train.csv").read_bytes())
    result = run_builder("--source-dir", str(partial), "--output-dir", str(tmp_path / "out"))
    assert_one_line_failure(result, "test.csv", "not found")
    assert sorted(os.listdir(tmp_path)) == ["partial"]


def test_existing_output_dir_untouched(source_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("other data")
    result = run_builder("--source-dir", str(source_dir), "--output-dir", str(out))
    assert_one_line_failure(result, "already exists")
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_unreachable_hub_names_alternative(tmp_path):
    # The real hub code path, offline: huggingface_hub fails at once and nothing is cached in this HF_HOME.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = run_builder("--output-dir", str(tmp_path / "out"), env=env)
    assert_one_line_failure(result, "sapientinc/sudoku-extreme", "--source-dir", "generate_sudoku")
    assert not (tmp_path / "out").exists()
