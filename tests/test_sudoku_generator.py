"""dataset/generate_sudoku.py: every puzzle has exactly one solution (checked by an independent solver written
here), the blank and rating knobs hold, and the files depend only on the seed."""

import csv
import subprocess
import sys

import pytest

from dataset import generate_sudoku
from tests.conftest import REPO, one_error_line


def count_solutions(grid, limit=2):
    """Plain backtracking over row/column/box digit sets, most constrained cell first; stops at `limit`."""
    grid = list(grid)
    rows, cols, boxes = [set() for _ in range(9)], [set() for _ in range(9)], [set() for _ in range(9)]
    for i, v in enumerate(grid):
        if v:
            r, c, b = i // 9, i % 9, (i // 27) * 3 + (i % 9) // 3
            if v in rows[r] or v in cols[c] or v in boxes[b]:
                return 0
            rows[r].add(v), cols[c].add(v), boxes[b].add(v)

    def options(i):
        r, c, b = i // 9, i % 9, (i // 27) * 3 + (i % 9) // 3
        return [v for v in range(1, 10) if v not in rows[r] and v not in cols[c] and v not in boxes[b]]

    def search():
        empty = [i for i, v in enumerate(grid) if not v]
        if not empty:
            return 1
        cell = min(empty, key=lambda i: len(options(i)))
        r, c, b = cell // 9, cell % 9, (cell // 27) * 3 + (cell % 9) // 3
        found = 0
        for v in options(cell):
            grid[cell] = v
            rows[r].add(v), cols[c].add(v), boxes[b].add(v)
            found += search()
            rows[r].discard(v), cols[c].discard(v), boxes[b].discard(v)
            grid[cell] = 0
            if found >= limit:
                break
        return found

    return search()


def run_generator(out, *flags):
    return subprocess.run([sys.executable, "-m", "dataset.generate_sudoku", "--output-dir", str(out), *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def read_rows(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["source", "question", "answer", "rating"]
    return rows[1:]


# 22 puzzles = two chunks, so --workers 2 really splits the work.
FLAGS = ["--num-train", "16", "--num-test", "6", "--min-blanks", "45", "--max-blanks", "54", "--seed", "7"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "src"
    result = run_generator(out, *FLAGS, "--workers", "2")
    assert result.returncode == 0, result.stderr
    return out


def test_puzzles_unique_and_consistent(generated):
    train, test = read_rows(generated / "train.csv"), read_rows(generated / "test.csv")
    assert (len(train), len(test)) == (16, 6)
    for source, question, answer, rating in train + test:
        assert len(question) == len(answer) == 81 and set(answer) <= set("123456789")
        assert 45 <= question.count(".") <= 54 and set(question) <= set(".123456789")
        assert all(q in (".", a) for q, a in zip(question, answer))
        grid = [0 if ch == "." else int(ch) for ch in question]
        assert count_solutions(grid) == 1
        solved = [int(ch) for ch in answer]
        assert count_solutions(solved) == 1  # the answer itself is a valid grid
        assert int(rating) >= 0
    blank_counts = {q.count(".") for _, q, _, _ in train + test}
    assert len(blank_counts) > 3  # counts are drawn over the range, not stuck at one end
    # Disjoint: no puzzle and no solution grid in both splits.
    assert not {r[1] for r in train} & {r[1] for r in test}
    assert not {r[2] for r in train} & {r[2] for r in test}


def test_same_seed_same_files_any_worker_count(generated, tmp_path):
    result = run_generator(tmp_path / "again", *FLAGS, "--workers", "1")
    assert result.returncode == 0, result.stderr
    for name in ("train.csv", "test.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (generated / name).read_bytes()
    other = FLAGS[:-1] + ["8"]
    assert run_generator(tmp_path / "other", *other, "--workers", "1").returncode == 0
    assert (tmp_path / "other" / "train.csv").read_bytes() != (generated / "train.csv").read_bytes()


def test_exact_blank_count_and_min_rating():
    puzzles = generate_sudoku.generate(6, 54, 54, 3, seed=1, workers=1, progress=False)
    for question, answer, rating in puzzles:
        assert question.count(".") == 54 and rating >= 3
        grid = [0 if ch == "." else int(ch) for ch in question]
        solutions, dead_ends = generate_sudoku.solve(grid)
        assert solutions == [[int(ch) for ch in answer]] and dead_ends == rating


def test_rating_ignores_digit_labels():
    # The complete search tree does not depend on which digit is tried first, so relabelling keeps the rating.
    for question, _, rating in generate_sudoku.generate(4, 55, 55, 1, seed=2, workers=1, progress=False):
        relabel = {str(d): str(10 - d) for d in range(1, 10)}
        grid = [0 if ch == "." else int(relabel[ch]) for ch in question]
        assert generate_sudoku.solve(grid)[1] == rating


def test_bad_arguments(tmp_path):
    result = run_generator(tmp_path / "out", "--num-train", "1", "--num-test", "1", "--min-blanks", "70")
    assert result.returncode == 1
    one_error_line(result.stderr, "--max-blanks")
    assert not (tmp_path / "out").exists()
