"""ARC builder: byte-identical to the reference on the fixture configurations, structurally sound, and failing with
one clear line on bad input."""

import hashlib
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from dataset import build_arc_dataset as arc
from dataset.common import inverse_aug
from tests.conftest import one_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = os.path.join(ROOT, "kaggle", "combined", "arc-agi")
CHECKSUMS = os.path.join(ROOT, "tests", "fixtures", "arc-builder-checksums.txt")


def _checksum_configs():
    """[(builder argv with OUT placeholder, {relative path: md5})] from the reference's checksum file."""
    configs = []
    with open(CHECKSUMS) as f:
        for line in f:
            if line.startswith("## python -m dataset.build_arc_dataset"):
                configs.append((shlex.split(line.split("dataset.build_arc_dataset", 1)[1]), {}))
            elif line.strip() and not line.startswith("#"):
                md5, path = line.split()
                configs[-1][1][os.path.normpath(path)] = md5
    return configs


def _build(out_dir, argv):
    argv = [os.path.join(ROOT, a) if a.startswith("kaggle/") else a for a in argv]
    arc.main([str(out_dir) if a == "OUT" else a for a in argv])
    return str(out_dir)


def _md5s(root):
    sums = {}
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                sums[os.path.relpath(os.path.join(folder, name), root)] = hashlib.md5(f.read()).hexdigest()
    return sums


CONFIGS = _checksum_configs()


@pytest.fixture(scope="module")
def arc1_small(tmp_path_factory):
    """The ARC-AGI-1 checksum configuration (num-aug 3), built once for several tests."""
    return _build(tmp_path_factory.mktemp("arc1") / "out", CONFIGS[0][0])


def test_checksum_file_has_both_configurations():
    assert len(CONFIGS) == 2 and all(len(sums) == 14 for _, sums in CONFIGS)


def test_arc1_matches_reference_md5(arc1_small):
    assert _md5s(arc1_small) == CONFIGS[0][1]


def test_arc2_matches_reference_md5(tmp_path):
    assert _md5s(_build(tmp_path / "out", CONFIGS[1][0])) == CONFIGS[1][1]


# --- the random stream ------------------------------------------------------------------------------------------


def test_legacy_random_matches_numpy_legacy_draws():
    np.random.seed(123)
    bounded = [np.random.randint(0, h) for h in [1, 2, 8, 9, 17, 30, 31, 1000] * 20]
    items = list(range(57))
    np.random.shuffle(items)
    # Enough augmentation trials to run past the generator's first buffered chunk of words.
    trials = [(np.random.randint(0, 8), [0] + np.random.permutation(np.arange(1, 10)).tolist()) for _ in range(7000)]
    many = np.random.randint(0, 30, size=70000).tolist()  # past a chunk boundary of scalar draws too
    after = np.random.randint(0, 2**31)

    rng = arc.LegacyRandom(123)
    assert [rng.interval(h - 1) for h in [1, 2, 8, 9, 17, 30, 31, 1000] * 20] == bounded
    shuffled = list(range(57))
    rng.shuffle(shuffled)
    assert shuffled == items
    transforms, colour_maps, words_used = rng.peek_augmentations(7000)
    assert list(zip(transforms, colour_maps)) == trials
    rng.skip(words_used[2999])  # take only the first 3000 trials
    transforms, colour_maps, words_used = rng.peek_augmentations(4000)
    assert list(zip(transforms, colour_maps)) == trials[3000:]
    rng.skip(words_used[-1])
    assert [rng.interval(29) for _ in range(70000)] == many
    assert rng.interval(2**31 - 1) == after  # and the streams are still in step


# --- structure of a built dataset ---------------------------------------------------------------------------------


def _load_split(root, split):
    arrays = {f: np.load(os.path.join(root, split, f"all__{f}.npy")) for f in
              ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")}
    with open(os.path.join(root, split, "dataset.json")) as f:
        return arrays, json.load(f)


def _decode(row):
    """(grid colours [h, w], top-left offset) of a 900-token row, checking the EOS rails and padding around it."""
    canvas = row.reshape(30, 30)
    rs, cs = np.nonzero(canvas >= 2)
    r0, r1, c0, c1 = rs.min(), rs.max() + 1, cs.min(), cs.max() + 1
    grid = canvas[r0:r1, c0:c1]
    assert (grid >= 2).all(), "grid cells form a rectangle"
    expected = np.zeros((30, 30), dtype=np.uint8)
    expected[r0:r1, c0:c1] = grid
    if r1 < 30:
        expected[r1, c0:c1] = 1
    if c1 < 30:
        expected[r0:r1, c1] = 1
    assert (canvas == expected).all(), "EOS rail below and right of the grid, padding elsewhere"
    return grid - 2, (int(r0), int(c0))


def _original_puzzles():
    """base name -> (subset, puzzle JSON with test outputs filled in), read independently of the builder."""
    puzzles = {}
    for subset in ("training", "evaluation", "concept"):
        with open(f"{PREFIX}_{subset}_challenges.json") as f:
            challenges = json.load(f)
        with open(f"{PREFIX}_{subset}_solutions.json") as f:
            solutions = json.load(f)
        for name, puzzle in challenges.items():
            for pair, output in zip(puzzle["test"], solutions[name]):
                pair["output"] = output
            assert name not in puzzles
            puzzles[name] = (subset, puzzle)
    return puzzles


def test_index_arrays_and_metadata(arc1_small):
    with open(os.path.join(arc1_small, "identifiers.json")) as f:
        identifiers = json.load(f)
    assert identifiers[0] == "<blank>"
    for split, groups in (("train", 960), ("test", 400)):
        a, meta = _load_split(arc1_small, split)
        n_ex, n_puz = len(a["inputs"]), len(a["puzzle_identifiers"])
        assert a["inputs"].shape == a["labels"].shape == (n_ex, 900) and a["inputs"].dtype == np.uint8
        for field, end in (("puzzle_indices", n_ex), ("group_indices", n_puz)):
            offsets = a[field]
            assert offsets.dtype == np.int32 and offsets[0] == 0 and offsets[-1] == end
            assert (np.diff(offsets) > 0).all()
        assert len(a["group_indices"]) == groups + 1
        assert a["inputs"].max() <= 11 and a["labels"].max() <= 11
        assert meta == {
            "pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": 12, "seq_len": 900,
            "num_puzzle_identifiers": len(identifiers), "total_groups": groups,
            "mean_puzzle_examples": n_ex / n_puz, "total_puzzles": n_puz, "sets": ["all"],
        }
        assert 1 <= a["puzzle_identifiers"].min() and a["puzzle_identifiers"].max() < len(identifiers)


def test_every_example_inverts_to_its_original_and_is_routed_right(arc1_small):
    originals = _original_puzzles()
    with open(os.path.join(arc1_small, "identifiers.json")) as f:
        identifiers = json.load(f)
    with open(os.path.join(arc1_small, "test_puzzles.json")) as f:
        assert set(json.load(f)) == {n for n, (subset, _) in originals.items() if subset == "evaluation"}
    seen_bases = {}
    for split in ("train", "test"):
        a, _ = _load_split(arc1_small, split)
        gi, pi = a["group_indices"], a["puzzle_indices"]
        for g in range(len(gi) - 1):
            names = [identifiers[i] for i in a["puzzle_identifiers"][gi[g]:gi[g + 1]]]
            base = names[0]
            assert len(set(names)) == len(names) == 4  # the original and 3 distinct augmentations
            subset, puzzle = originals[base]
            if split == "test":
                pairs = puzzle["test"]  # evaluation test pairs only in the test split
            elif subset == "evaluation":
                pairs = puzzle["train"]
            else:
                pairs = [p for kind in puzzle for p in puzzle[kind]]  # the file's key order
            seen_bases.setdefault(split, []).append(base)
            for p, name in zip(range(gi[g], gi[g + 1]), names):
                assert inverse_aug(name)[0] == base
                invert = inverse_aug(name)[1]
                rows = range(pi[p], pi[p + 1])
                assert len(rows) == len(pairs)
                offsets = []
                for row, pair in zip(rows, pairs):
                    inp, (r, c) = _decode(a["inputs"][row])
                    out, offset = _decode(a["labels"][row])
                    assert offset == (r, c), "input and label share the translation"
                    offsets.append(offset)
                    assert np.array_equal(invert(inp), np.array(pair["input"]))
                    assert np.array_equal(invert(out), np.array(pair["output"]))
                if split == "test":
                    assert set(offsets) == {(0, 0)}
                else:
                    assert (0, 0) in offsets  # the one example left untranslated
    assert sorted(seen_bases["train"]) == sorted(originals)
    assert sorted(seen_bases["test"]) == sorted(n for n, (s, _) in originals.items() if s == "evaluation")


# --- bad input ----------------------------------------------------------------------------------------------------

GOOD_PUZZLE = {"train": [{"input": [[1, 2], [0, 3]], "output": [[3, 3]]}], "test": [{"input": [[4]]}]}


def _write(path, obj):
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def _run(prefix, out_dir):
    cmd = [sys.executable, "-m", "dataset.build_arc_dataset", "--input-file-prefix", str(prefix), "--output-dir",
           str(out_dir), "--subsets", "tr", "ev", "--test-set-name", "ev", "--num-aug", "2"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.fixture
def inputs(tmp_path):
    """A tiny valid input set: subsets "tr" and "ev" (the test set, with solutions)."""
    _write(tmp_path / "p_tr_challenges.json", {"a": GOOD_PUZZLE})
    _write(tmp_path / "p_ev_challenges.json", {"b": GOOD_PUZZLE})
    _write(tmp_path / "p_ev_solutions.json", {"b": [[[5, 5]]]})
    return tmp_path


def test_tiny_inputs_build(inputs):
    result = _run(inputs / "p", inputs / "out")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(inputs / "out")) == ["identifiers.json", "test", "test_puzzles.json", "train"]


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("p_tr_challenges.json", '{"a": [1, }',
         "p_tr_challenges.json is not valid JSON: Expecting value at line 1 column 11"),
        ("p_tr_challenges.json", None, "p_tr_challenges.json not found"),
        ("p_tr_challenges.json", {"a": {"train": [{"input": [[1] * 31], "output": [[1]]}], "test": []}},
         "puzzle a train pair 0 in"),
        ("p_tr_challenges.json", {"a": {"train": [{"input": [[1, 10]], "output": [[1]]}], "test": []}},
         "values outside the colours 0..9"),
        ("p_tr_challenges.json", {"a": {"train": [{"input": [[[1]]], "output": [[1]]}], "test": []}},
         "is not a 2-D grid"),
        ("p_ev_solutions.json", {"b": []}, "one output grid per test input of puzzle b"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(inputs, file, content, message):
    if content is None:
        os.remove(inputs / file)
    else:
        _write(inputs / file, content)
    result = _run(inputs / "p", inputs / "out")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and one_error_line(result.stderr, message)
    assert not [f for f in os.listdir(inputs) if f.startswith(("out", ".out"))]


def test_existing_output_dir_is_refused(inputs):
    os.makedirs(inputs / "out")
    _write(inputs / "out" / "keep.txt", "mine")
    result = _run(inputs / "p", inputs / "out")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    one_error_line(result.stderr, "already exists")
    assert os.listdir(inputs / "out") == ["keep.txt"]
