"""Offline maze generator: writes `train.csv` / `test.csv` in the column layout of the hub dataset
`sapientinc/maze-30x30-hard-1k`, so `build_maze_dataset.py --source-dir` can build a dataset without the hub.

Walls are drawn independently per cell. S and G go on open cells whose shortest path has at least
--min-path-length path cells (`o`, S and G excluded; the hub's hard mazes have 108 or more). The answer marks the
path the hub's data marks: breadth-first search from S trying the neighbours down, left, right, up, each cell
keeping its first discoverer (this rule reproduces all 2000 hub mazes). The rating column is the number of path
cells. Output depends only on the arguments and `--seed`, not on the number of workers.

    python -m dataset.generate_maze --output-dir data/maze-gen-src --num-train 1000 --num-test 1000 \\
        --min-path-length 108
"""

import argparse
import functools
from typing import List, Tuple

import numpy as np

from dataset.common import DatasetBuildError, generate_in_chunks, parse_generator_args, run_cli, write_generated_csvs


def breadth_first(open_cells: List[bool], width: int, start: int) -> Tuple[List[int], List[int]]:
    """(distance, parent) of every cell from `start` over open cells, -1 where unreachable, on a grid stored row by
    row `width` cells wide whose border cells are closed (so no bounds checks). Neighbours are tried down, left,
    right, up, and a cell's parent is the first cell that reaches it: the hub data's tie-break."""
    dist = [-1] * len(open_cells)
    parent = [-1] * len(open_cells)
    dist[start] = 0
    queue = [start]
    for u in queue:  # the list grows while iterated: a FIFO queue without deque overhead
        du = dist[u] + 1
        for v in (u + width, u - 1, u + 1, u - width):
            if open_cells[v] and dist[v] < 0:
                dist[v] = du
                parent[v] = u
                queue.append(v)
    return dist, parent


def _pad(grid: np.ndarray) -> Tuple[List[bool], int]:
    """A [side, side] bool grid of open cells with a closed border added, flattened; and its width."""
    return np.pad(grid, 1).ravel().tolist(), grid.shape[1] + 2


def solve_maze(question: str, side: int) -> str:
    """The answer string for a question string: its cells with the S-to-G path marked `o`."""
    cells = np.array(list(question)).reshape(side, side)
    open_cells, width = _pad(cells != "#")
    start, goal = (int(np.flatnonzero(np.pad(cells == ch, 1).ravel())[0]) for ch in "SG")
    _, parent = breadth_first(open_cells, width, start)
    if parent[goal] < 0:
        raise ValueError("G is not reachable from S")
    marked = np.pad(cells, 1)
    cell = parent[goal]
    while cell != start:
        marked.flat[cell] = "o"
        cell = parent[cell]
    return "".join(marked[1:-1, 1:-1].ravel())


def _generate_one(rng: np.random.Generator, side: int, wall_density: float, min_path_length: int) -> Tuple[str, str, int]:
    while True:
        walls = rng.random((side, side)) < wall_density
        open_cells, width = _pad(~walls)
        cells = np.flatnonzero(open_cells)
        if len(cells) < 2:
            continue
        # Far ends: the cell farthest from a random open cell is near an end of the longest paths of its region,
        # whose length is at most twice that distance.
        dist, _ = breadth_first(open_cells, width, int(cells[rng.integers(len(cells))]))
        farthest = max(dist)
        if 2 * farthest - 1 < min_path_length:
            continue
        end = dist.index(farthest)
        dist = np.array(breadth_first(open_cells, width, end)[0])
        others = np.flatnonzero((dist - 1 >= min_path_length) & (dist > 0))
        if not len(others):
            continue  # this wall layout has no path that long: draw another
        other = int(others[rng.integers(len(others))])
        start, goal = (end, other) if rng.random() < 0.5 else (other, end)
        question = np.where(np.pad(walls, 1), "#", " ")
        question.flat[start], question.flat[goal] = "S", "G"
        question = "".join(question[1:-1, 1:-1].ravel())
        answer = solve_maze(question, side)
        return question, answer, answer.count("o")


def _generate_chunk(rng: np.random.Generator, count: int, side: int, wall_density: float,
                    min_path_length: int) -> List[Tuple[str, str, int]]:
    return [_generate_one(rng, side, wall_density, min_path_length) for _ in range(count)]


def main(args: argparse.Namespace) -> None:
    if args.size < 2 or not 0 <= args.wall_density < 1 or not 0 <= args.min_path_length <= args.size ** 2 - 2:
        raise DatasetBuildError("need --size >= 2, 0 <= --wall-density < 1 and 0 <= --min-path-length <= size^2 - 2")
    make_chunk = functools.partial(_generate_chunk, side=args.size, wall_density=args.wall_density,
                                   min_path_length=args.min_path_length)
    # Distinct questions, so train and test share no maze.
    write_generated_csvs(args, lambda count: generate_in_chunks(make_chunk, count, args.seed, args.workers,
                                                                key=lambda maze: maze[0], desc="mazes"))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=30, help="side of the square grid")
    parser.add_argument("--min-path-length", type=int, default=0,
                        help="fewest path cells between S and G (the hub's hard 30x30 mazes: 108)")
    parser.add_argument("--wall-density", type=float, default=0.37,
                        help="probability of a wall per cell (the hub's mazes average 0.37)")


def parse_args(argv=None) -> argparse.Namespace:
    return parse_generator_args(__doc__, _add_arguments, argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
