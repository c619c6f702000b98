"""Build the ARC-AGI training data (REFERENCE.md section 2.1): every puzzle plus up to `--num-aug` recoloured and
rotated/mirrored versions, randomly translated on a 30x30 canvas. Output is byte-identical to the reference builder's
(same files, same NumPy legacy random stream), built in bounded memory and several times faster.

    python -m dataset.build_arc_dataset --input-file-prefix kaggle/combined/arc-agi \\
        --output-dir data/arc1concept-aug-1000 --subsets training evaluation concept --test-set-name evaluation
"""

import argparse
import itertools
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

from dataset.common import (
    DatasetBuildError,
    PuzzleDatasetMetadata,
    atomic_output_dir,
    dihedral_transform,
    run_cli,
    write_json,
)

GRID_SIZE = 30  # canvas side; grids are at most 30x30
SEQ_LEN = GRID_SIZE * GRID_SIZE
PAD, EOS, COLOUR_OFFSET = 0, 1, 2  # tokens: 0 pad, 1 end-of-grid rail, 2..11 colours 0..9
VOCAB_SIZE = 12
AUG_RETRIES_FACTOR = 5  # the reference tries at most 5 * num_aug random augmentations per puzzle
SPLITS = ("train", "test")  # identifier and serialisation order (see `build`)
TRANSPOSING = {1, 3, 6, 7}  # dihedral ids that swap a grid's height and width


def _progress(items, desc: str):
    # A bar on stderr only when it is a terminal, so logs and tests stay quiet.
    return tqdm(items, desc=desc, leave=False, disable=None)

# ---------------------------------------------------------------------------------------------------------------
# The reference draws everything from NumPy's legacy global RNG, one C call per number. Reproducing its stream
# in Python from MT19937's raw 32-bit words is exact and far cheaper: legacy `randint(0, n)`, `permutation` and
# `shuffle` all reduce to "bounded interval" draws that mask a word to the smallest covering power of two and
# reject values above the bound (no word is consumed when the bound is 0).
# ---------------------------------------------------------------------------------------------------------------


def _interval_mask(high: int) -> int:
    mask = high
    for shift in (1, 2, 4, 8, 16):
        mask |= mask >> shift
    return mask


_MASKS = [_interval_mask(high) for high in range(64)]
# Legacy permutation of 9 items: Fisher-Yates from the back, swap position i with a draw from 0..i.
_PERMUTATION_9_STEPS = [(i, _MASKS[i]) for i in range(8, 0, -1)]


class LegacyRandom:
    """The draws of `np.random.seed(seed)` followed by legacy `randint` / `permutation` / `shuffle`, bit for bit."""

    def __init__(self, seed: int):
        bitgen = np.random.MT19937()
        bitgen.state = np.random.RandomState(seed).get_state(legacy=False)  # legacy seeding of MT19937
        chunks = (bitgen.random_raw(1 << 16).tolist() for _ in itertools.count())
        self.next_word = itertools.chain.from_iterable(chunks).__next__

    def interval(self, high: int) -> int:
        """Uniform integer in 0..high, as legacy `randint(0, high + 1)`."""
        if high == 0:
            return 0
        mask = _MASKS[high] if high < len(_MASKS) else _interval_mask(high)
        value = self.next_word() & mask
        while value > high:
            value = self.next_word() & mask
        return value

    def shuffle(self, items: list) -> None:
        """In place, as legacy `shuffle(items)`."""
        for i in range(len(items) - 1, 0, -1):
            j = self.interval(i)
            items[i], items[j] = items[j], items[i]

    def colour_map(self) -> List[int]:
        """[0] + legacy `permutation(np.arange(1, 10))`: colour 0 (background) stays fixed."""
        perm = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        next_word = self.next_word
        for i, mask in _PERMUTATION_9_STEPS:
            j = next_word() & mask
            while j > i:
                j = next_word() & mask
            perm[i + 1], perm[j + 1] = perm[j + 1], perm[i + 1]
        return perm


# ---------------------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------------------


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetBuildError(f"{path} not found; check --input-file-prefix and --subsets") from None
    except json.JSONDecodeError as e:
        raise DatasetBuildError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def _grid(value, where: str) -> np.ndarray:
    """A validated ARC grid as uint8 [h, w]."""
    try:
        arr = np.array(value)
    except ValueError:  # ragged rows
        arr = None
    if arr is None or arr.ndim != 2 or not (1 <= arr.shape[0] <= GRID_SIZE and 1 <= arr.shape[1] <= GRID_SIZE):
        raise DatasetBuildError(f"{where} is not a 2-D grid of 1..{GRID_SIZE} rows and columns")
    if arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 9:
        raise DatasetBuildError(f"{where} has values outside the colours 0..9")
    return arr.astype(np.uint8)


def load_subset(prefix: str, subset: str) -> List[Tuple[str, dict]]:
    """(name, puzzle JSON) in file order, with each test pair's "output" filled from the solutions file."""
    challenges_path = f"{prefix}_{subset}_challenges.json"
    solutions_path = f"{prefix}_{subset}_solutions.json"
    puzzles = _read_json(challenges_path)
    if not isinstance(puzzles, dict):
        raise DatasetBuildError(f"{challenges_path} must map puzzle names to puzzles")
    if os.path.isfile(solutions_path):
        solutions = _read_json(solutions_path)
        for name, puzzle in puzzles.items():
            tests = puzzle.get("test", []) if isinstance(puzzle, dict) else []
            if not isinstance(solutions, dict) or len(solutions.get(name, [])) != len(tests):
                raise DatasetBuildError(
                    f"{solutions_path} must list one output grid per test input of puzzle {name} ({len(tests)})"
                )
            for pair, output in zip(tests, solutions[name]):
                pair["output"] = output
    else:
        print(f"{solutions_path} does not exist: test outputs set to [[0]]")
        for puzzle in puzzles.values():
            for pair in puzzle.get("test", []) if isinstance(puzzle, dict) else []:
                pair.setdefault("output", [[0]])
    return list(puzzles.items())


@dataclass
class Puzzle:
    """One ARC puzzle and its accepted versions (version 0 = the original)."""

    name: str
    examples: Dict[str, List[Tuple[np.ndarray, np.ndarray]]]  # split -> (input, output) pairs in source order
    transforms: np.ndarray  # uint8 [V]: dihedral id of each version
    colour_maps: np.ndarray  # uint8 [V, 10]: new colour of each old colour, per version

    def version_names(self) -> List[str]:
        digits = (self.colour_maps[1:] + ord("0")).tobytes().decode()
        return [self.name] + [
            f"{self.name}|||t{t}|||{digits[10 * i:10 * i + 10]}" for i, t in enumerate(self.transforms[1:].tolist())
        ]


def convert_puzzle(name: str, puzzle, source: str, routing: Dict[str, str]) -> Dict[str, list]:
    """Route the puzzle's pairs to splits (`routing`: "train"/"test" key -> split), in the puzzle's key order."""
    if not isinstance(puzzle, dict) or not puzzle or set(puzzle) - set(routing):
        raise DatasetBuildError(f"puzzle {name} in {source} must have only \"train\" and \"test\" pair lists")
    examples = {split: [] for split in dict.fromkeys(routing.values())}
    for kind, pairs in puzzle.items():
        if not isinstance(pairs, list):
            raise DatasetBuildError(f"puzzle {name} {kind} in {source} must be a list of pairs")
        for i, pair in enumerate(pairs):
            where = f"puzzle {name} {kind} pair {i} in {source}"
            if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
                raise DatasetBuildError(f"{where} needs an \"input\" and an \"output\" grid")
            inp, out = _grid(pair["input"], f"{where} input"), _grid(pair["output"], f"{where} output")
            examples[routing[kind]].append((inp, out))
    for split, pairs in examples.items():
        if not pairs:
            raise DatasetBuildError(f"puzzle {name} in {source} has no pairs for the {split} split")
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------------

# The reference keeps a version only if its SHA-256 "puzzle hash" is new; that hash is equal exactly when the
# multisets of (input shape, input cells, output shape, output cells) over all pairs are equal. We compare those
# multisets directly: each pair is one byte string (shapes stored as 100 + size, so a colour map leaves them
# alone), recoloured with bytes.translate, and a version's key is its sorted tuple of pair strings.
_TRANSLATE_TAIL = bytes(range(10, 256))


def _pair_bytes(inp: np.ndarray, out: np.ndarray) -> bytes:
    return b"".join(bytes((100 + g.shape[0], 100 + g.shape[1])) + g.tobytes() for g in (inp, out))


def augment(examples: List[Tuple[np.ndarray, np.ndarray]], num_aug: int, rng: LegacyRandom) -> Tuple[np.ndarray, np.ndarray]:
    """Draw up to AUG_RETRIES_FACTOR * num_aug (dihedral id, colour map) trials, keep distinct puzzles, stop at
    1 + num_aug versions. Returns (transforms uint8 [V], colour maps uint8 [V, 10]), version 0 = identity."""
    # Per dihedral id, all pairs transformed and concatenated; a pair's (start, end) is the same for every id.
    per_transform = [
        b"".join(_pair_bytes(dihedral_transform(i, t), dihedral_transform(o, t)) for i, o in examples) for t in range(8)
    ]
    ends = list(itertools.accumulate(4 + i.size + o.size for i, o in examples))
    bounds = list(zip([0] + ends[:-1], ends))

    def key(t: int, colour_map: List[int]) -> tuple:
        recoloured = per_transform[t].translate(bytes(colour_map) + _TRANSLATE_TAIL)
        return tuple(sorted(recoloured[a:b] for a, b in bounds))

    # A trial whose dihedral id and colour map on the puzzle's colours repeat an earlier trial's gives the same
    # puzzle, which is already in `seen`: skip the content comparison. This is what makes the thousands of trials
    # of few-colour puzzles (which never reach 1 + num_aug versions) cheap.
    used_colours = sorted(set(itertools.chain.from_iterable(np.unique(g).tolist() for pair in examples for g in pair)))
    identity = list(range(10))
    versions = [(0, identity)]
    seen = {key(0, identity)}
    tried = {(0, tuple(used_colours))}
    if num_aug > 0:
        for _ in range(AUG_RETRIES_FACTOR * num_aug):
            t = rng.interval(7)
            colour_map = rng.colour_map()
            trial = (t, tuple([colour_map[c] for c in used_colours]))
            if trial in tried:
                continue
            tried.add(trial)
            k = key(t, colour_map)
            if k not in seen:
                seen.add(k)
                versions.append((t, colour_map))
                if len(versions) > num_aug:
                    break
    transforms = np.array([t for t, _ in versions], dtype=np.uint8)
    colour_maps = np.array([m for _, m in versions], dtype=np.uint8)
    return transforms, colour_maps


# ---------------------------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------------------------


def _render_group(puzzle: Puzzle, split: str, pad_r: np.ndarray, pad_c: np.ndarray, out: np.ndarray,
                  scratch: np.ndarray) -> np.ndarray:
    """Render one group's rows (version-major, then examples) into out[:, :rows] (uint8 [2 (inputs, labels),
    >= rows, SEQ_LEN]) and return that view; row i's grids are translated by (pad_r[i], pad_c[i]).

    Per (dihedral id, example), all versions at once: draw the grid and its EOS rails at the top-left of a canvas
    in the right half of `scratch` (uint8 [>= versions, 2 * SEQ_LEN], left half zero), then copy the 900-token
    window that starts `shift` = pad_r * 30 + pad_c before the canvas. In the flattened canvas that window is
    the grid translated by (pad_r, pad_c); a bottom rail pushed off the canvas falls outside it, and a right
    rail pushed off (pad_c + width = 30) would wrap to the next row, so it is not drawn for those rows."""
    examples = puzzle.examples[split]
    n_ex = len(examples)
    n_rows = len(puzzle.transforms) * n_ex
    out = out[:, :n_rows]
    window_start = SEQ_LEN - (pad_r * GRID_SIZE + pad_c)  # [rows]
    colour_tokens = puzzle.colour_maps + COLOUR_OFFSET  # [V, 10]: token of each original colour, per version
    for t in range(8):
        versions = np.flatnonzero(puzzle.transforms == t)
        n = len(versions)
        if n == 0:
            continue
        tokens = colour_tokens[versions]
        canvas = scratch[:n, SEQ_LEN:].reshape(n, GRID_SIZE, GRID_SIZE)
        windows = sliding_window_view(scratch[:n], SEQ_LEN, axis=1)  # [n, SEQ_LEN + 1, SEQ_LEN], a view
        for e, pair in enumerate(examples):
            rows = versions * n_ex + e
            for dest, grid in zip(out, pair):
                grid = dihedral_transform(grid, t)
                h, w = grid.shape
                canvas.fill(PAD)
                canvas[:, :h, :w] = tokens[:, grid.ravel()].reshape(n, h, w)
                if h < GRID_SIZE:
                    canvas[:, h, :w] = EOS
                if w < GRID_SIZE:
                    canvas[:, :h, w] = EOS
                    canvas[pad_c[rows] + w == GRID_SIZE, :h, w] = PAD
                dest[rows] = windows[np.arange(n), window_start[rows]]
    return out


def _draw_translations(puzzle: Puzzle, rng: LegacyRandom) -> Tuple[np.ndarray, np.ndarray]:
    """The reference's translations (pad_r, pad_c: intp [rows]) of one train-split group, version-major: per
    version one `no_aug_id` draw over its examples, then for every other example pad_r then pad_c, uniform over the
    offsets that keep both grids on the canvas. The `no_aug_id` example stays at (0, 0)."""
    examples = puzzle.examples["train"]
    n_ex = len(examples)
    free_rows = [GRID_SIZE - max(i.shape[0], o.shape[0]) for i, o in examples]
    free_cols = [GRID_SIZE - max(i.shape[1], o.shape[1]) for i, o in examples]
    bounds = {False: list(zip(free_rows, free_cols)), True: list(zip(free_cols, free_rows))}
    pad_r, pad_c = bytearray(len(puzzle.transforms) * n_ex), bytearray(len(puzzle.transforms) * n_ex)
    interval = rng.interval
    row = 0
    for t in puzzle.transforms.tolist():
        no_aug_id = interval(n_ex - 1)
        for e, (high_r, high_c) in enumerate(bounds[t in TRANSPOSING]):
            if e != no_aug_id:
                pad_r[row + e] = interval(high_r)
                pad_c[row + e] = interval(high_c)
        row += n_ex
    return np.frombuffer(pad_r, dtype=np.uint8).astype(np.intp), np.frombuffer(pad_c, dtype=np.uint8).astype(np.intp)


def _open_npy(path: str, dtype, shape: Tuple[int, ...]):
    """A file that starts with exactly `np.save`'s header for an array of this dtype and shape, for the caller to
    append the data to. Its full size is reserved up front: on ext4 that makes the gigabytes of writes several
    times cheaper than growing the file block by block."""
    f = open(path, "wb")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)
    if hasattr(os, "posix_fallocate"):  # Unix only
        os.posix_fallocate(f.fileno(), 0, f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return f


def write_split(root: str, split: str, groups: List[Puzzle], ids: np.ndarray, num_identifiers: int, rng) -> None:
    """Write `<root>/<split>/`: the five arrays of set "all" and dataset.json. `rng` draws the train translations
    (None for the test split, whose reference draws are never used)."""
    split_dir = os.path.join(root, split)
    os.makedirs(split_dir)
    versions_per_group = np.array([len(p.transforms) for p in groups], dtype=np.int64)
    examples_per_version = np.repeat([len(p.examples[split]) for p in groups], versions_per_group)
    n_rows = int(examples_per_version.sum())
    index_arrays = {
        "puzzle_identifiers": ids,
        "puzzle_indices": np.concatenate([[0], np.cumsum(examples_per_version)]),
        "group_indices": np.concatenate([[0], np.cumsum(versions_per_group)]),
    }
    for field, arr in index_arrays.items():
        np.save(os.path.join(split_dir, f"all__{field}.npy"), arr.astype(np.int32))

    # Gigabytes of rows are streamed group by group. The writes run in a thread so that rendering the next group
    # overlaps the disk (a thread blocked in write() releases the GIL); two output buffers alternate.
    max_rows = max(len(p.transforms) * len(p.examples[split]) for p in groups)
    buffers = [np.empty((2, max_rows, SEQ_LEN), dtype=np.uint8) for _ in range(2)]
    scratch = np.zeros((max(len(p.transforms) for p in groups), 2 * SEQ_LEN), dtype=np.uint8)
    paths = [os.path.join(split_dir, f"all__{field}.npy") for field in ("inputs", "labels")]
    files = [_open_npy(path, np.uint8, (n_rows, SEQ_LEN)) for path in paths]
    with files[0], files[1], ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for i, puzzle in enumerate(_progress(groups, f"writing {split}")):
            if rng is not None:
                pad_r, pad_c = _draw_translations(puzzle, rng)
            else:
                pad_r = pad_c = np.zeros(len(puzzle.transforms) * len(puzzle.examples[split]), dtype=np.intp)
            rendered = _render_group(puzzle, split, pad_r, pad_c, buffers[i % 2], scratch)
            if pending is not None:
                pending.result()  # also frees the other buffer for the next group
            pending = writer.submit(lambda rows: [f.write(arr) for f, arr in zip(files, rows)], rendered)
        if pending is not None:
            pending.result()

    metadata = PuzzleDatasetMetadata(
        pad_id=PAD,
        ignore_label_id=PAD,
        blank_identifier_id=0,
        vocab_size=VOCAB_SIZE,
        seq_len=SEQ_LEN,
        num_puzzle_identifiers=num_identifiers,
        total_groups=len(groups),
        mean_puzzle_examples=n_rows / len(ids),
        total_puzzles=len(ids),
        sets=["all"],
    )
    write_json(os.path.join(split_dir, "dataset.json"), metadata.model_dump())


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> None:
    if args.test_set_name not in args.subsets:
        raise DatasetBuildError(f"--test-set-name {args.test_set_name} is not one of --subsets {' '.join(args.subsets)}")
    if args.num_aug < 0 or args.puzzle_identifiers_start < 1:
        raise DatasetBuildError("--num-aug must be >= 0 and --puzzle-identifiers-start >= 1")
    test_sets = {args.test_set_name, args.test_set_name2}

    with atomic_output_dir(args.output_dir) as root:
        # Read and check every input before the long work starts (reading draws no random numbers).
        subsets = {}
        for subset in args.subsets:
            source = f"{args.input_file_prefix}_{subset}_challenges.json"
            routing = {"train": "train", "test": "test" if subset in test_sets else "train"}
            subsets[subset] = [
                (name, raw, convert_puzzle(name, raw, source, routing))
                for name, raw in load_subset(args.input_file_prefix, subset)
            ]

        # Steps 1-3 of REFERENCE.md 2.1, one subset after the other: shuffle, then augment each puzzle.
        rng = LegacyRandom(args.seed)
        groups: Dict[str, List[Puzzle]] = {split: [] for split in SPLITS}
        test_puzzles = {}
        not_full = []
        for subset, entries in subsets.items():
            rng.shuffle(entries)
            for name, raw, examples in _progress(entries, f"augmenting {subset}"):
                if subset in test_sets:
                    test_puzzles[name] = raw
                transforms, colour_maps = augment([p for pairs in examples.values() for p in pairs], args.num_aug, rng)
                if len(transforms) < args.num_aug + 1:
                    not_full.append((len(transforms), name))
                puzzle = Puzzle(name, examples, transforms, colour_maps)
                for split in examples:
                    groups[split].append(puzzle)
        if not_full:
            fewest, name = min(not_full)
            print(f"{len(not_full)} puzzles have fewer than {args.num_aug + 1} distinct versions (few colours or "
                  f"symmetric), down to {fewest} ({name})")

        # Identifiers: splits in order, then groups, then versions; a name seen before keeps its id. The reference
        # orders splits by creation, which is train first whenever the first subset is not a test set (otherwise
        # it depends on Python's string hashing); here train always comes first.
        identifier_map: Dict[str, int] = {}
        split_ids = {}
        for split in SPLITS:
            ids = []
            for puzzle in groups[split]:
                for name in puzzle.version_names():
                    ids.append(identifier_map.setdefault(name, len(identifier_map) + args.puzzle_identifiers_start))
            split_ids[split] = np.array(ids, dtype=np.int32)
        num_identifiers = len(identifier_map) + args.puzzle_identifiers_start

        for split in SPLITS:
            if groups[split]:
                # The test split is serialised last, so its reference draws (no_aug_id only) influence nothing.
                rng_or_none = rng if split == "train" else None
                write_split(root, split, groups[split], split_ids[split], num_identifiers, rng_or_none)

        names = ["<blank>"] * num_identifiers
        for name, i in identifier_map.items():
            names[i] = name
        write_json(os.path.join(root, "identifiers.json"), names)
        write_json(os.path.join(root, "test_puzzles.json"), test_puzzles)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-file-prefix", required=True, help="e.g. kaggle/combined/arc-agi")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--subsets", nargs="+", required=True, help="e.g. training evaluation concept")
    parser.add_argument("--test-set-name", required=True, help="subset whose test pairs form the test split")
    parser.add_argument("--test-set-name2", default="your_test_set")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-aug", type=int, default=1000)
    parser.add_argument("--puzzle-identifiers-start", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    build(parse_args(argv))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
