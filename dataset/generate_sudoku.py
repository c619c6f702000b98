"""Offline Sudoku generator: writes `train.csv` / `test.csv` in the column layout of the hub dataset
`sapientinc/sudoku-extreme`, so `build_sudoku_dataset.py --source-dir` can build a dataset without the hub.

Each puzzle comes from its own random solution grid, has exactly one solution, and is rated by the search effort
of a deterministic backtracking solver (naked and hidden singles, then the most constrained cell, lowest index on
ties): the number of dead ends in its complete search tree, 0 = solved by singles alone. Blanks are removed
greedily in random order while the solution stays unique; that ends at 53-59 blanks, so counts above 58 are slow
to reach and 60 is the limit. Output depends only on the arguments and `--seed`, not on the number of workers.

    python -m dataset.generate_sudoku --output-dir data/sudoku-gen-src --num-train 10000 --num-test 1000 \\
        --min-blanks 50 --seed 0
"""

import argparse
import functools
from typing import List, Optional, Tuple

import numpy as np

from dataset.common import DatasetBuildError, generate_in_chunks, parse_generator_args, run_cli, write_generated_csvs

# A candidate set is a 9-bit mask: bit d-1 set <=> digit d possible.
FULL = 0x1FF
POPCOUNT = [bin(m).count("1") for m in range(FULL + 1)]
BIT_TO_DIGIT = {1 << d: d + 1 for d in range(9)}
MASK_BITS = [[1 << d for d in range(9) if m >> d & 1] for m in range(FULL + 1)]

UNITS = (
    [[r * 9 + c for c in range(9)] for r in range(9)]
    + [[r * 9 + c for r in range(9)] for c in range(9)]
    + [[(br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3)] for br in range(3) for bc in range(3)]
)
PEERS = [sorted({p for u in UNITS if i in u for p in u} - {i}) for i in range(81)]

# Greedy removal reaches 59 blanks in about 3% of grids and 60 far more rarely (64 = 17 givens is the proven
# limit for any method); beyond 60 generation would practically never finish.
MAX_BLANKS = 60


def _propagate(cand: List[int], queue: List[int]) -> bool:
    """Apply naked and hidden singles to fixpoint, starting by removing the values of the cells in `queue` from
    their peers. Modifies `cand` in place; False on a contradiction."""
    while True:
        while queue:
            cell = queue.pop()
            bit = cand[cell]
            for p in PEERS[cell]:
                c = cand[p]
                if c & bit:
                    c ^= bit
                    if not c:
                        return False
                    cand[p] = c
                    if not c & (c - 1):
                        queue.append(p)
        # Hidden singles: a digit with exactly one possible cell in a unit goes there.
        for unit in UNITS:
            once = twice = 0
            for cell in unit:
                m = cand[cell]
                twice |= once & m
                once |= m
            if once != FULL:
                return False  # some digit has no place left in this unit
            hidden = once & ~twice
            if hidden:
                for cell in unit:
                    m = cand[cell] & hidden
                    if m and cand[cell] != m:
                        if m & (m - 1):
                            return False  # two digits that each need this cell
                        cand[cell] = m
                        queue.append(cell)
        if not queue:
            return True


def _branch_cell(cand: List[int]) -> int:
    """Unsolved cell with the fewest candidates (lowest index on ties), or -1 when all are solved."""
    best, best_n = -1, 10
    for i in range(81):
        n = POPCOUNT[cand[i]]
        if 1 < n < best_n:
            best, best_n = i, n
            if n == 2:
                break
    return best


def _search(cand: List[int], limit: int, digit_order: Optional[List[List[int]]] = None) -> Tuple[List[List[int]], int]:
    """Depth-first search from propagated candidates `cand` for up to `limit` solutions.

    Returns (solutions as candidate lists, dead ends). The explored tree depends only on the branching rule, not
    on the order in which digits are tried, so when fewer than `limit` solutions exist the dead-end count is a
    property of the puzzle. `digit_order[cell]` (a permutation of bits) randomizes which solution comes first."""
    solutions, dead_ends = [], 0
    # Entries are (candidates, cell, bit): a branch not yet propagated, so a search that stops early skips the
    # work for siblings it never visits. (cand, -1, 0) stands for the already propagated root.
    stack = [(cand, -1, 0)]
    while stack:
        cand, cell, bit = stack.pop()
        if cell >= 0:
            cand = cand.copy()
            cand[cell] = bit
            if not _propagate(cand, [cell]):
                dead_ends += 1
                continue
        cell = _branch_cell(cand)
        if cell < 0:
            solutions.append(cand)
            if len(solutions) >= limit:
                break
            continue
        m = cand[cell]
        bits = MASK_BITS[m] if digit_order is None else [b for b in digit_order[cell] if m & b]
        stack.extend((cand, cell, b) for b in reversed(bits))  # try the first digit first
    return solutions, dead_ends


def _initial_candidates(grid: List[int]) -> Optional[List[int]]:
    """Propagated candidates for `grid` (81 digits, 0 = blank), or None if the givens contradict."""
    cand = [1 << (v - 1) if v else FULL for v in grid]
    if not _propagate(cand, [i for i, v in enumerate(grid) if v]):
        return None
    return cand


def solve(grid: List[int], limit: int = 2) -> Tuple[List[List[int]], int]:
    """Solutions (up to `limit`, as digit lists) of `grid` (81 digits, 0 = blank) and the search's dead ends."""
    cand = _initial_candidates(grid)
    if cand is None:
        return [], 1
    solutions, dead_ends = _search(cand, limit)
    return [[BIT_TO_DIGIT[b] for b in s] for s in solutions], dead_ends


def _random_solution(rng: np.random.Generator) -> List[int]:
    """A random complete grid: the three diagonal boxes (which share no row or column) get random digits, then a
    search with a random digit order per cell completes the grid."""
    grid = [0] * 81
    for box, digits in zip((0, 4, 8), rng.permuted(np.tile(np.arange(1, 10), (3, 1)), axis=1).tolist()):
        for cell, digit in zip(UNITS[18 + box], digits):
            grid[cell] = digit
    digit_order = (1 << rng.permuted(np.tile(np.arange(9), (81, 1)), axis=1)).tolist()
    solutions, _ = _search(_initial_candidates(grid), 1, digit_order)
    return [BIT_TO_DIGIT[b] for b in solutions[0]]


def _removal_keeps_unique(grid: List[int], cell: int, value: int) -> bool:
    """With `grid[cell]` already blanked: True iff no solution puts another digit than `value` there."""
    bit = 1 << (value - 1)
    seen = 0
    for p in PEERS[cell]:
        if grid[p]:
            seen |= 1 << (grid[p] - 1)
    if seen | bit == FULL:
        return True  # naked single: the other givens force `value`
    cand = [1 << (v - 1) if v else FULL for v in grid]
    cand[cell] = FULL & ~bit
    if not _propagate(cand, [i for i, v in enumerate(grid) if v]):
        return True
    solutions, _ = _search(cand, 1)
    return not solutions


def _generate_one(rng: np.random.Generator, min_blanks: int, max_blanks: int, min_rating: int) -> Tuple[str, str, int]:
    """One puzzle as (question with '.' blanks, answer, rating); retries until the knobs hold."""
    while True:
        solution = _random_solution(rng)
        target = int(rng.integers(min_blanks, max_blanks + 1))
        grid = solution.copy()
        blanks = 0
        # Blank cells in random order, skipping any whose removal would admit a second solution.
        for cell in rng.permutation(81).tolist():
            if blanks == target:
                break
            grid[cell] = 0
            if _removal_keeps_unique(grid, cell, solution[cell]):
                blanks += 1
            else:
                grid[cell] = solution[cell]
        if blanks < target:
            continue  # reached a minimal puzzle with fewer blanks: start over from a new grid
        solutions, rating = solve(grid, limit=2)
        assert len(solutions) == 1 and solutions[0] == solution
        if rating >= min_rating:
            question = "".join(str(v) if v else "." for v in grid)
            return question, "".join(map(str, solution)), rating


def _generate_chunk(rng: np.random.Generator, count: int, min_blanks: int, max_blanks: int,
                    min_rating: int) -> List[Tuple[str, str, int]]:
    return [_generate_one(rng, min_blanks, max_blanks, min_rating) for _ in range(count)]


def generate(num_puzzles: int, min_blanks: int, max_blanks: int, min_rating: int, seed: int, workers: int,
             progress: bool = True) -> List[Tuple[str, str, int]]:
    """`num_puzzles` puzzles with pairwise distinct solution grids, in a seed-determined order."""
    make_chunk = functools.partial(_generate_chunk, min_blanks=min_blanks, max_blanks=max_blanks,
                                   min_rating=min_rating)
    return generate_in_chunks(make_chunk, num_puzzles, seed, workers, key=lambda puzzle: puzzle[1],
                              desc="sudoku puzzles", progress=progress)


def main(args: argparse.Namespace) -> None:
    max_blanks = args.min_blanks if args.max_blanks is None else args.max_blanks
    if not 0 <= args.min_blanks <= max_blanks <= MAX_BLANKS:
        raise DatasetBuildError(f"need 0 <= --min-blanks <= --max-blanks <= {MAX_BLANKS}, "
                                f"got {args.min_blanks} and {max_blanks}")
    # Solution grids are pairwise distinct, so train and test share no puzzle and no solution.
    write_generated_csvs(args, lambda count: generate(count, args.min_blanks, max_blanks, args.min_rating, args.seed,
                                                      args.workers))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-blanks", type=int, required=True, help="fewest blank cells per puzzle")
    parser.add_argument("--max-blanks", type=int, default=None,
                        help=f"most blank cells (default: --min-blanks, at most {MAX_BLANKS}); each puzzle draws "
                             "its count uniformly; above 58 generation gets slow")
    parser.add_argument("--min-rating", type=int, default=0,
                        help="keep only puzzles whose solver search hits at least this many dead ends "
                             "(at 55 blanks about 40%% of puzzles rate 1 or more, 17%% rate 3 or more)")


def parse_args(argv=None) -> argparse.Namespace:
    return parse_generator_args(__doc__, _add_arguments, argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
