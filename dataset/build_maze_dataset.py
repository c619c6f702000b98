"""Build the Maze-Hard dataset (docs/compatibility.md section 2.3) from the hub repo or from local CSVs.

Grids are square, row by row over `# SGo` (wall, open, start, goal, path) = tokens 1..5. With --aug each train maze
becomes a group of its 8 dihedral versions; the test split is never augmented. Unlike the reference, the train
subsample is drawn from a generator seeded with --seed.

    python dataset/build_maze_dataset.py --output-dir data/maze-30x30-hard-1k --aug
"""

import argparse
import math
import os
import sys
from typing import Tuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.common import (DatasetBuildError, add_source_arguments, atomic_output_dir, dihedral_transform,
                            read_source_csv, read_source_splits, run_cli, save_single_example_split, subsample,
                            write_json)

CHARSET = "# SGo"
CHAR_TO_TOKEN = np.zeros(256, dtype=np.uint8)
CHAR_TO_TOKEN[[ord(c) for c in CHARSET]] = np.arange(1, len(CHARSET) + 1)
OFFLINE_HINT = ("build from local CSVs with --source-dir DIR (DIR/train.csv and DIR/test.csv in the hub's layout), "
                "e.g. ones written offline by python -m dataset.generate_maze")


def read_split(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(questions, answers) of one CSV as uint8 token grids [N, side, side]; all mazes must have one size."""
    texts, side = [], None
    for line, question, answer, _ in read_source_csv(path):
        for column, text in (("question", question), ("answer", answer)):
            if side is None:
                side = math.isqrt(len(text))
                if side * side != len(text) or side == 0:
                    raise DatasetBuildError(f"{path} line {line}: {column} has {len(text)} characters, "
                                            "not a square grid")
            if len(text) != side * side:
                raise DatasetBuildError(f"{path} line {line}: {column} has {len(text)} characters, expected "
                                        f"{side * side} ({side}x{side} like the first maze)")
            bad = set(text) - set(CHARSET)
            if bad:
                raise DatasetBuildError(f"{path} line {line}: {column} has character {min(bad)!r}, "
                                        f"expected only {CHARSET!r}")
        texts += [question, answer]
    if not texts:
        raise DatasetBuildError(f"{path} holds no mazes")
    # Validated ASCII, so one byte per cell; both columns interleaved, then split.
    tokens = CHAR_TO_TOKEN[np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8)].reshape(-1, 2, side, side)
    return tokens[:, 0], tokens[:, 1]


def write_split(root: str, split: str, inputs: np.ndarray, labels: np.ndarray, group_size: int) -> None:
    """Save one split of [N, side, side] token grids."""
    save_single_example_split(root, split, inputs.reshape(len(inputs), -1), labels.reshape(len(labels), -1),
                              vocab_size=len(CHARSET) + 1, group_size=group_size)  # PAD + charset


def dihedral_versions(grids: np.ndarray) -> np.ndarray:
    """[N, s, s] -> [N * 8, s, s]: each grid followed by its dihedral transforms 1..7."""
    return np.stack([dihedral_transform(g, t) for g in grids for t in range(8)])


def main(args: argparse.Namespace) -> None:
    if args.subsample_size is not None and args.subsample_size < 1:
        raise DatasetBuildError("--subsample-size must be >= 1")
    rng = np.random.default_rng(args.seed)
    with atomic_output_dir(args.output_dir) as tmp:
        splits = read_source_splits(args, read_split, OFFLINE_HINT)
        if splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
            raise DatasetBuildError(f"train mazes are {splits['train'][0].shape[1]} wide but test mazes "
                                    f"{splits['test'][0].shape[1]}; both splits need one size")
        questions, answers = subsample(*splits["train"], args.subsample_size, rng)
        if args.aug:
            write_split(tmp, "train", dihedral_versions(questions), dihedral_versions(answers), group_size=8)
        else:
            write_split(tmp, "train", questions, answers, group_size=1)
        write_split(tmp, "test", *splits["test"], group_size=1)
        write_json(os.path.join(tmp, "identifiers.json"), ["<blank>"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_arguments(parser, "sapientinc/maze-30x30-hard-1k", "data/maze-30x30-hard-1k", rows="mazes")
    parser.add_argument("--aug", action="store_true", help="each train maze -> group of its 8 dihedral versions")
    parser.add_argument("--seed", type=int, default=0, help="seeds the subsample")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
