"""Build the Sudoku-Extreme dataset (docs/compatibility.md section 2.2) from the hub repo or from local CSVs.

Two deliberate differences from the reference: the train subsample and every augmentation draw come from one
NumPy generator seeded with --seed (the reference used the never-seeded global RNG), and inputs/labels are uint8
also with --num-aug > 0 (the reference wrote int64 there, 8x the size: docs/compatibility.md section 12, item 10).

    python dataset/build_sudoku_dataset.py --output-dir data/sudoku-extreme-1k-aug-1000 \\
        --subsample-size 1000 --num-aug 1000
"""

import argparse
import os
import re
import sys
from typing import List, Optional, Tuple

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.common import (DatasetBuildError, add_source_arguments, atomic_output_dir, read_source_csv,
                            read_source_splits, run_cli, save_single_example_split, subsample, write_json)

QUESTION_RE = re.compile(r"[.0-9]{81}")  # '.' or '0' = blank
ANSWER_RE = re.compile(r"[1-9]{81}")
AUG_BLOCK = 1 << 16  # augmented boards drawn per vectorized step (bounds memory, not the result's randomness)
OFFLINE_HINT = ("build from local CSVs with --source-dir DIR (DIR/train.csv and DIR/test.csv), e.g. ones written "
                "offline by python -m dataset.generate_sudoku")


def _check_cells(path: str, line: int, column: str, text: str, pattern: re.Pattern, allowed: str) -> None:
    if pattern.fullmatch(text):
        return
    if len(text) != 81:
        raise DatasetBuildError(f"{path} line {line}: {column} has {len(text)} characters, expected 81")
    bad = next(c for c in text if c not in allowed)
    raise DatasetBuildError(f"{path} line {line}: {column} has character {bad!r}, expected only {allowed!r}")


def read_split(path: str, min_difficulty: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """(questions, answers) of one CSV as uint8 [N, 81] digits with 0 = blank, rows rated >= min_difficulty."""
    questions, answers, lines = [], [], []
    for line, question, answer, rating in read_source_csv(path):
        _check_cells(path, line, "question", question, QUESTION_RE, ".0123456789")
        _check_cells(path, line, "answer", answer, ANSWER_RE, "123456789")
        if min_difficulty is not None:
            try:
                if int(rating) < min_difficulty:
                    continue
            except ValueError:
                raise DatasetBuildError(f"{path} line {line}: rating {rating!r} is not an integer") from None
        questions.append(question)
        answers.append(answer)
        lines.append(line)

    def to_digits(rows: List[str]) -> np.ndarray:
        # One string for all rows: millions of rows convert in one vectorized step.
        return np.frombuffer("".join(rows).replace(".", "0").encode(), dtype=np.uint8).reshape(-1, 81) - ord("0")

    questions, answers = to_digits(questions), to_digits(answers)
    conflicts = np.flatnonzero(((questions != 0) & (questions != answers)).any(axis=1))
    if len(conflicts):
        raise DatasetBuildError(f"{path} line {lines[conflicts[0]]}: a given of the question differs from the answer")
    return questions, answers


def shuffle_sudoku(boards: np.ndarray, solutions: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Apply one random validity-preserving transform per row to uint8 [K, 81] boards and their solutions (the
    same transform to both): optional transpose, band and in-band row permutations, stack and in-stack column
    permutations, then a relabelling of the digits 1..9 (0 = blank stays 0)."""
    k = len(boards)
    digit_map = np.zeros((k, 10), dtype=np.uint8)
    digit_map[:, 1:] = rng.permuted(np.tile(np.arange(1, 10, dtype=np.uint8), (k, 1)), axis=1)
    transpose = rng.random(k) < 0.5

    def line_perm() -> np.ndarray:  # [K, 9]: blocks of three lines permuted, and the lines within each block
        blocks = rng.permuted(np.tile(np.arange(3), (k, 1)), axis=1)
        within = rng.permuted(np.tile(np.arange(3), (k, 3, 1)), axis=2)
        return (3 * blocks[:, :, None] + within).reshape(k, 9)

    row_perm, col_perm = line_perm(), line_perm()
    # new (r, c) = old (row_perm[r], col_perm[c]) of the (optionally transposed) board, as a flat source index.
    straight = 9 * row_perm[:, :, None] + col_perm[:, None, :]
    transposed = row_perm[:, :, None] + 9 * col_perm[:, None, :]
    source = np.where(transpose[:, None, None], transposed, straight).reshape(k, 81)

    rows = np.arange(k)[:, None]
    return (digit_map[rows, np.take_along_axis(boards, source, axis=1)],
            digit_map[rows, np.take_along_axis(solutions, source, axis=1)])


def augment(questions: np.ndarray, answers: np.ndarray, num_aug: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """[N * (1 + num_aug), 81] inputs and labels: each puzzle followed by its num_aug shuffled copies."""
    copies = 1 + num_aug
    n = len(questions)
    inputs = np.empty((n, copies, 81), dtype=np.uint8)
    labels = np.empty((n, copies, 81), dtype=np.uint8)
    inputs[:, 0], labels[:, 0] = questions, answers
    if num_aug:
        block = max(1, AUG_BLOCK // num_aug)  # puzzles per step
        for start in tqdm(range(0, n, block), desc="augmenting", file=sys.stderr):
            end = min(n, start + block)
            boards, solutions = shuffle_sudoku(np.repeat(questions[start:end], num_aug, axis=0),
                                               np.repeat(answers[start:end], num_aug, axis=0), rng)
            inputs[start:end, 1:] = boards.reshape(end - start, num_aug, 81)
            labels[start:end, 1:] = solutions.reshape(end - start, num_aug, 81)
    return inputs.reshape(-1, 81), labels.reshape(-1, 81)


def write_split(root: str, split: str, inputs: np.ndarray, labels: np.ndarray, group_size: int) -> None:
    """Save one split of [N, 81] digit boards (0 = blank)."""
    # token = digit + 1, so blank = 1 and 0 stays free for PAD; vocabulary PAD + blank + digits 1..9.
    save_single_example_split(root, split, inputs + np.uint8(1), labels + np.uint8(1), vocab_size=10 + 1,
                              group_size=group_size)


def main(args: argparse.Namespace) -> None:
    if args.num_aug < 0 or (args.subsample_size is not None and args.subsample_size < 1):
        raise DatasetBuildError("--num-aug must be >= 0 and --subsample-size >= 1")
    rng = np.random.default_rng(args.seed)
    with atomic_output_dir(args.output_dir) as tmp:
        # Read and validate both splits before the long augmentation step.
        splits = read_source_splits(args, lambda path: read_split(path, args.min_difficulty), OFFLINE_HINT)
        questions, answers = subsample(*splits["train"], args.subsample_size, rng)
        inputs, labels = augment(questions, answers, args.num_aug, rng)
        write_split(tmp, "train", inputs, labels, group_size=1 + args.num_aug)
        write_split(tmp, "test", *splits["test"], group_size=1)
        write_json(os.path.join(tmp, "identifiers.json"), ["<blank>"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_arguments(parser, "sapientinc/sudoku-extreme", "data/sudoku-extreme-full", rows="puzzles")
    parser.add_argument("--min-difficulty", type=int, default=None, help="keep rows rated at least this (both splits)")
    parser.add_argument("--num-aug", type=int, default=0, help="shuffled copies per train puzzle")
    parser.add_argument("--seed", type=int, default=0, help="seeds the subsample and the augmentations")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
