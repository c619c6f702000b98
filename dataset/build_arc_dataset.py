"""Build the ARC-AGI training data (docs/compatibility.md section 2.1): every puzzle plus up to `--num-aug`
recoloured and rotated/mirrored versions, randomly translated on a 30x30 canvas. Output is byte-identical to the
reference builder's (same files, same NumPy legacy random stream), built in bounded memory and several times faster.

    python -m dataset.build_arc_dataset --input-file-prefix kaggle/combined/arc-agi \\
        --output-dir data/arc1concept-aug-1000 --subsets training evaluation concept --test-set-name evaluation
"""

import argparse
import contextlib
import itertools
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

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
# from MT19937's raw 32-bit words is exact and far cheaper: legacy `randint(0, n)`, `permutation` and `shuffle`
# all reduce to "bounded interval" draws that mask a word to the smallest covering power of two and reject values
# above the bound (no word is used when the bound is 0).
# ---------------------------------------------------------------------------------------------------------------


def _interval_mask(high: int) -> int:
    mask = high
    for shift in (1, 2, 4, 8, 16):
        mask |= mask >> shift
    return mask


_MASKS = [_interval_mask(high) for high in range(64)]
# Legacy permutation of the 9 colours 1..9: Fisher-Yates from the back, swapping item i with a draw from 0..i.
_PERMUTATION_9_STEPS = [(i, _MASKS[i]) for i in range(8, 0, -1)]


class LegacyRandom:
    """The draws of `np.random.seed(seed)` followed by legacy `randint` / `permutation` / `shuffle`, bit for bit."""

    def __init__(self, seed: int):
        self._bitgen = np.random.MT19937()
        self._bitgen.state = np.random.RandomState(seed).get_state(legacy=False)  # legacy seeding of MT19937
        self._words: List[int] = []  # raw words drawn from the generator; those from _pos on are unused
        self._pos = 0

    def _drop_used_words(self) -> None:
        del self._words[:self._pos]
        self._pos = 0

    def _more_words(self) -> None:
        """Append fresh words (in place: positions in the buffer stay valid)."""
        self._words.extend(self._bitgen.random_raw(1 << 16).tolist())

    def interval(self, high: int) -> int:
        """Uniform integer in 0..high, as legacy `randint(0, high + 1)`."""
        if high == 0:
            return 0
        mask = _MASKS[high] if high < len(_MASKS) else _interval_mask(high)
        words, p = self._words, self._pos
        try:
            value = words[p] & mask
            while value > high:
                p += 1
                value = words[p] & mask
        except IndexError:  # ran out of buffered words: start this draw again with more
            self._drop_used_words()
            self._more_words()
            return self.interval(high)
        self._pos = p + 1
        return value

    def shuffle(self, items: list) -> None:
        """In place, as legacy `shuffle(items)`."""
        for i in range(len(items) - 1, 0, -1):
            j = self.interval(i)
            items[i], items[j] = items[j], items[i]

    def peek_augmentations(self, count: int) -> Tuple[List[int], List[List[int]], List[int]]:
        """The next `count` augmentation trials (legacy `randint(0, 8)`, then `permutation(np.arange(1, 10))`)
        without using them up: dihedral ids, colour maps (10 entries, colour 0 fixed) and, for `skip`, the number
        of words used by trials 0..k."""
        transforms, colour_maps, words_used = [], [], []
        self._drop_used_words()
        words, p = self._words, 0
        while len(transforms) < count:
            trial_start = p
            try:
                t = words[p] & 7  # randint(0, 8): mask 7 accepts every word
                p += 1
                perm = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
                for i, mask in _PERMUTATION_9_STEPS:
                    j = words[p] & mask
                    p += 1
                    while j > i:
                        j = words[p] & mask
                        p += 1
                    perm[i + 1], perm[j + 1] = perm[j + 1], perm[i + 1]
            except IndexError:  # ran out of buffered words: redo this trial with more
                self._more_words()
                p = trial_start
                continue
            transforms.append(t)
            colour_maps.append(perm)
            words_used.append(p)
        return transforms, colour_maps, words_used

    def skip(self, n_words: int) -> None:
        self._pos += n_words


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
# multisets of (input shape, input cells, output shape, output cells) over all pairs are equal. We decide the same
# equality, cheaply, in three steps per trial:
#   1. A trial whose dihedral id and colour map on the puzzle's colours repeat an earlier trial's gives that
#      trial's puzzle: a duplicate. This settles most of the thousands of trials of few-colour puzzles.
#   2. Otherwise a 64-bit hash per pair that is linear in the colour map, so a whole batch of trials is one NumPy
#      product; a version's hash is its sorted pair hashes. A new hash means a new puzzle.
#   3. Only when the hash is already known, compare the actual pair contents.
# Each pair is one byte string: height and width stored as 100 + size (so a colour map leaves them alone), then
# the cells, for the input and then the output.
_PAIR_BYTES_MAX = 2 * (2 + SEQ_LEN)
_POSITION_WEIGHTS = np.random.default_rng(0).integers(0, 2**64, size=_PAIR_BYTES_MAX, dtype=np.uint64)
_TRANSLATE_TAIL = bytes(range(10, 256))


def _pair_bytes(inp: np.ndarray, out: np.ndarray) -> bytes:
    return b"".join(bytes((100 + g.shape[0], 100 + g.shape[1])) + g.tobytes() for g in (inp, out))


class _PuzzleContent:
    """A puzzle's pairs under each dihedral transform, for comparing versions."""

    def __init__(self, examples: List[Tuple[np.ndarray, np.ndarray]]):
        # Per dihedral id, all pairs concatenated; a pair's (start, end) is the same for every id.
        self.pair_bytes = [
            b"".join(_pair_bytes(dihedral_transform(i, t), dihedral_transform(o, t)) for i, o in examples)
            for t in range(8)
        ]
        lengths = [4 + i.size + o.size for i, o in examples]
        ends = list(itertools.accumulate(lengths))
        self.bounds = list(zip([0] + ends[:-1], ends))
        # Pair hash = sum over bytes of (recoloured byte value) * weight of its position, mod 2**64, so
        # hash(t, m) = constant[t] + colour_weights[t] @ m.
        n_pairs = len(examples)
        pair_of_byte = np.repeat(np.arange(n_pairs), lengths)
        weights = _POSITION_WEIGHTS[np.concatenate([np.arange(n) for n in lengths])]
        self.colour_weights = np.zeros((8, n_pairs * 10), dtype=np.uint64)
        self.constant = np.zeros((8, n_pairs), dtype=np.uint64)
        for t, content in enumerate(self.pair_bytes):
            values = np.frombuffer(content, dtype=np.uint8)
            is_colour = values < 10
            np.add.at(self.colour_weights[t], pair_of_byte[is_colour] * 10 + values[is_colour], weights[is_colour])
            np.add.at(self.constant[t], pair_of_byte[~is_colour], values[~is_colour] * weights[~is_colour])
        self.colour_weights = self.colour_weights.reshape(8, n_pairs, 10)
        used = np.unique(np.concatenate([g.ravel() for pair in examples for g in pair])).tolist()
        self.colours = [c for c in used if c != 0]  # colour 0 is never remapped

    def trial_codes(self, transforms: np.ndarray, colour_maps: np.ndarray) -> List[int]:
        """Step 1 key: the dihedral id and the colour map restricted to the puzzle's colours, as one integer."""
        digits = 10 ** np.arange(len(self.colours))[::-1]
        return (transforms * 10 ** len(self.colours) + colour_maps[:, self.colours] @ digits).tolist()

    def hashes(self, transforms: np.ndarray, colour_maps: np.ndarray) -> np.ndarray:
        """Step 2 key: uint64 [trials, pairs], sorted per trial."""
        # uint64 arithmetic wraps: mod 2**64.
        h = np.einsum("kpc,kc->kp", self.colour_weights[transforms], colour_maps.astype(np.uint64))
        h += self.constant[transforms]
        h.sort(axis=1)
        return h

    def exact(self, transform: int, colour_map: List[int]) -> tuple:
        """Step 3 key: the sorted recoloured pair strings."""
        recoloured = self.pair_bytes[transform].translate(bytes(colour_map) + _TRANSLATE_TAIL)
        return tuple(sorted(recoloured[a:b] for a, b in self.bounds))


def augment(examples: List[Tuple[np.ndarray, np.ndarray]], num_aug: int,
            rng: LegacyRandom) -> Tuple[np.ndarray, np.ndarray]:
    """Draw up to AUG_RETRIES_FACTOR * num_aug (dihedral id, colour map) trials, keep distinct puzzles, stop at
    1 + num_aug versions. Returns (transforms uint8 [V], colour maps uint8 [V, 10]), version 0 = identity."""
    content = _PuzzleContent(examples)
    identity_t, identity_map = np.zeros(1, dtype=np.int64), np.arange(10)[None]
    transforms, colour_maps = [0], [list(range(10))]
    tried = set(content.trial_codes(identity_t, identity_map))
    known = {content.hashes(identity_t, identity_map)[0].tobytes(): [0]}  # hash -> versions with that hash
    trials_left = AUG_RETRIES_FACTOR * num_aug
    while trials_left > 0 and len(transforms) <= num_aug:
        # A batch of trials, with a few spare for duplicates; those not needed go back to the stream unused.
        batch = min(trials_left, num_aug + 1 - len(transforms) + 16)
        batch_t, batch_maps, words_used = rng.peek_augmentations(batch)
        batch_t_array, batch_maps_array = np.array(batch_t), np.array(batch_maps)
        codes = content.trial_codes(batch_t_array, batch_maps_array)
        hashes = content.hashes(batch_t_array, batch_maps_array)
        hash_bytes, width = hashes.tobytes(), hashes.shape[1] * hashes.itemsize
        taken = batch
        for k in range(batch):
            if codes[k] in tried:
                continue
            tried.add(codes[k])
            h = hash_bytes[k * width:(k + 1) * width]
            t, colour_map = batch_t[k], batch_maps[k]
            if h in known:
                key = content.exact(t, colour_map)
                if any(content.exact(transforms[v], colour_maps[v]) == key for v in known[h]):
                    continue
            known.setdefault(h, []).append(len(transforms))
            transforms.append(t)
            colour_maps.append(colour_map)
            if len(transforms) > num_aug:
                taken = k + 1
                break
        rng.skip(words_used[taken - 1])
        trials_left -= taken
    return np.array(transforms, dtype=np.uint8), np.array(colour_maps, dtype=np.uint8)


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
    append the data to. Its full size is reserved up front: a full disk fails here rather than midway through,
    and on ext4 it made writing the gigabytes cheaper than growing the file block by block (1.5-3x here)."""
    f = open(path, "wb")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)
    size = f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if hasattr(os, "posix_fallocate"):  # Unix only
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            f.close()
            raise DatasetBuildError(f"cannot reserve {size / 1e9:.1f} GB for {path}: {e.strerror}") from None
    return f


def write_split(root: str, split: str, groups: List[Puzzle], ids: np.ndarray, num_identifiers: int,
                rng: Optional[LegacyRandom]) -> None:
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

    def write_rows(rendered: np.ndarray) -> None:
        for f, rows in zip(files, rendered):
            f.write(rows)

    with contextlib.ExitStack() as stack:
        files = [
            stack.enter_context(_open_npy(os.path.join(split_dir, f"all__{field}.npy"), np.uint8, (n_rows, SEQ_LEN)))
            for field in ("inputs", "labels")
        ]
        writer = stack.enter_context(ThreadPoolExecutor(max_workers=1))  # exits first: waits for the last write
        pending = None
        for i, puzzle in enumerate(_progress(groups, f"writing {split}")):
            if rng is not None:
                pad_r, pad_c = _draw_translations(puzzle, rng)
            else:
                pad_r = pad_c = np.zeros(len(puzzle.transforms) * len(puzzle.examples[split]), dtype=np.intp)
            rendered = _render_group(puzzle, split, pad_r, pad_c, buffers[i % 2], scratch)
            if pending is not None:
                pending.result()  # also frees the other buffer for the next group
            pending = writer.submit(write_rows, rendered)
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
        subsets = " ".join(args.subsets)
        raise DatasetBuildError(f"--test-set-name {args.test_set_name} is not one of --subsets {subsets}")
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

        # Steps 1-3 of docs/compatibility.md section 2.1, one subset after the other: shuffle, then augment each puzzle.
        rng = LegacyRandom(args.seed)
        groups: Dict[str, List[Puzzle]] = {split: [] for split in SPLITS}
        test_puzzles = {}
        not_full = []
        for subset, entries in subsets.items():
            rng.shuffle(entries)
            for name, raw, examples in _progress(entries, f"augmenting {subset}"):
                if subset in test_sets:
                    test_puzzles[name] = raw
                all_pairs = [pair for pairs in examples.values() for pair in pairs]
                transforms, colour_maps = augment(all_pairs, args.num_aug, rng)
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
