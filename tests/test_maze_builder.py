"""dataset/build_maze_dataset.py on 20+20 real 30x30 mazes (tests/fixtures/maze_small): tokens, dihedral
augmentation groups, metadata, seeded subsampling, and one-line errors for bad input; and the offline maze
generator dataset/generate_maze.py that feeds it."""

import collections
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dataset import build_maze_dataset as builder
from dataset import generate_maze
from dataset.common import DatasetBuildError, dihedral_transform
from tests.conftest import REPO, load_split, one_error_line

FIXTURE = os.path.join(REPO, "tests", "fixtures", "maze_small")
TOKEN_CHARS = "?# SGo"  # token t -> character; 0 (PAD) never appears


def csv_rows(split, source=FIXTURE):
    with open(os.path.join(source, f"{split}.csv"), newline="") as f:
        return list(csv.reader(f))[1:]


def build(output_dir, *flags):
    builder.main(builder.parse_args(["--source-dir", FIXTURE, "--output-dir", str(output_dir), *flags]))


def decode(tokens):
    return "".join(TOKEN_CHARS[t] for t in tokens)


def grid(text):  # CSV string -> [30, 30] array of characters
    return np.array(list(text)).reshape(30, 30)


def expected_metadata(groups):
    return {"pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": 6, "seq_len": 900,
            "num_puzzle_identifiers": 1, "total_groups": groups, "mean_puzzle_examples": 1.0,
            "total_puzzles": groups, "sets": ["all"]}


def test_tokens_decode_to_csv(tmp_path):
    build(tmp_path / "maze")
    for split in ("train", "test"):
        meta, arr = load_split(tmp_path / "maze", split)
        rows = csv_rows(split)
        assert meta == expected_metadata(len(rows))
        assert arr["inputs"].dtype == arr["labels"].dtype == np.uint8
        assert arr["inputs"].shape == (20, 900)
        assert [decode(t) for t in arr["inputs"]] == [r[1] for r in rows]
        assert [decode(t) for t in arr["labels"]] == [r[2] for r in rows]
        assert set(np.unique(arr["inputs"])) <= {1, 2, 3, 4} and 5 in arr["labels"]
        np.testing.assert_array_equal(arr["group_indices"], np.arange(21))
        np.testing.assert_array_equal(arr["puzzle_indices"], np.arange(21))
        np.testing.assert_array_equal(arr["puzzle_identifiers"], np.zeros(20))
        assert all(arr[k].dtype == np.int32 for k in ("group_indices", "puzzle_indices", "puzzle_identifiers"))
    with open(tmp_path / "maze" / "identifiers.json") as f:
        assert json.load(f) == ["<blank>"]


def test_aug_groups_hold_the_eight_dihedral_versions(tmp_path):
    build(tmp_path / "maze", "--aug")
    meta, arr = load_split(tmp_path / "maze", "train")
    assert meta == expected_metadata(20)
    assert arr["inputs"].shape == (160, 900)
    np.testing.assert_array_equal(arr["group_indices"], np.arange(0, 161, 8))
    np.testing.assert_array_equal(arr["puzzle_indices"], np.arange(161))
    for g, (_, question, answer, _) in enumerate(csv_rows("train")):
        for t in range(8):
            row = 8 * g + t
            assert decode(arr["inputs"][row]) == "".join(dihedral_transform(grid(question), t).flatten())
            assert decode(arr["labels"][row]) == "".join(dihedral_transform(grid(answer), t).flatten())
    # The test split is never augmented.
    meta, arr = load_split(tmp_path / "maze", "test")
    assert meta == expected_metadata(20) and arr["inputs"].shape == (20, 900)


def test_subsample_is_seeded(tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        build(tmp_path / name, "--subsample-size", "6", "--aug", "--seed", seed)
    originals = {r[1] for r in csv_rows("train")}
    _, arr = load_split(tmp_path / "a", "train")
    picked = [decode(t) for t in arr["inputs"][::8]]
    assert len(set(picked)) == 6 and set(picked) <= originals
    assert load_split(tmp_path / "a", "test")[1]["inputs"].shape == (20, 900)  # test is not subsampled
    same = (tmp_path / "b" / "train" / "all__inputs.npy").read_bytes()
    other = (tmp_path / "c" / "train" / "all__inputs.npy").read_bytes()
    assert (tmp_path / "a" / "train" / "all__inputs.npy").read_bytes() == same != other


def run_builder(*flags, env=None):
    """Run the builder as a script, the way the README recipes do."""
    return subprocess.run([sys.executable, "dataset/build_maze_dataset.py", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def assert_one_line_failure(result, *fragments):
    assert result.returncode == 1, result.stderr
    one_error_line(result.stderr, *fragments)


def source_with_bad_row(tmp_path, column, text):
    """A copy of the fixture whose train.csv gets one extra row (line 22) with `column` set to `text`."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    _, question, answer, _ = csv_rows("train")[0]
    row = ["x", text, answer, "0"] if column == "question" else ["x", question, text, "0"]
    with open(src / "train.csv", "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow(row)
    return src


@pytest.mark.parametrize("column, text, problem", [
    ("question", "#" * 899, "899 characters"),
    ("answer", "#" * 899 + "x", "'x'"),
    ("question", "#" * 899 + "\t", "'\\t'"),
], ids=["wrong-length", "bad-char", "tab"])
def test_bad_row(tmp_path, column, text, problem):
    src = source_with_bad_row(tmp_path, column, text)
    result = run_builder("--source-dir", str(src), "--output-dir", str(tmp_path / "out"))
    assert_one_line_failure(result, "train.csv line 22", column, problem)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no output and no temporary folder left behind


def test_non_square_first_row(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(FIXTURE, "test.csv"), src)
    (src / "train.csv").write_text("source,question,answer,rating\nx,S G,SoG,1\n")
    result = run_builder("--source-dir", str(src), "--output-dir", str(tmp_path / "out"))
    assert_one_line_failure(result, "train.csv line 2", "3 characters", "not a square")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_split_sizes_must_match(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(FIXTURE, "train.csv"), src)
    (src / "test.csv").write_text("source,question,answer,rating\nx,S G#,SoG#,1\n")  # a 2x2 maze
    result = run_builder("--source-dir", str(src), "--output-dir", str(tmp_path / "out"))
    assert_one_line_failure(result, "30 wide", "test mazes 2")


def test_missing_inputs(tmp_path):
    result = run_builder("--source-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out"))
    assert_one_line_failure(result, "nowhere", "not found")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(os.path.join(FIXTURE, "train.csv"), partial)
    result = run_builder("--source-dir", str(partial), "--output-dir", str(tmp_path / "out"))
    assert_one_line_failure(result, "test.csv", "not found")
    assert sorted(os.listdir(tmp_path)) == ["partial"]


def test_existing_output_dir_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("other data")
    result = run_builder("--source-dir", FIXTURE, "--output-dir", str(out))
    assert_one_line_failure(result, "already exists")
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_unreachable_hub_names_alternative(tmp_path):
    # The real hub code path, offline: huggingface_hub fails at once and nothing is cached in this HF_HOME.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = run_builder("--output-dir", str(tmp_path / "out"), env=env)
    assert_one_line_failure(result, "sapientinc/maze-30x30-hard-1k", "--source-dir")
    assert not (tmp_path / "out").exists()


def shortest_distance(question, side):
    """Moves from S to G (independent check of the generator: plain BFS)."""
    start, goal = question.index("S"), question.index("G")
    dist = {start: 0}
    queue = collections.deque([start])
    while queue:
        u = queue.popleft()
        r, c = divmod(u, side)
        for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            v = rr * side + cc
            if 0 <= rr < side and 0 <= cc < side and question[v] != "#" and v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist[goal]


def test_generator_path_rule_matches_hub_data():
    for split in ("train", "test"):
        for _, question, answer, _ in csv_rows(split):
            assert generate_maze.solve_maze(question, 30) == answer


def test_generated_mazes_build(tmp_path):
    # 24 mazes = two chunks, so --workers 2 really splits the work.
    flags = ["--num-train", "16", "--num-test", "8", "--size", "12", "--min-path-length", "20", "--seed", "3"]
    runs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"src{workers}"
        result = subprocess.run([sys.executable, "-m", "dataset.generate_maze", "--output-dir", str(out), *flags,
                                 "--workers", workers], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        runs[workers] = out
    for name in ("train.csv", "test.csv"):  # the worker count does not change the output
        assert (runs["1"] / name).read_bytes() == (runs["2"] / name).read_bytes()

    train, test = csv_rows("train", runs["1"]), csv_rows("test", runs["1"])
    assert (len(train), len(test)) == (16, 8)
    assert not {r[1] for r in train} & {r[1] for r in test}
    for _, question, answer, rating in train + test:
        assert len(question) == 144 and question.count("S") == question.count("G") == 1
        assert set(question) <= set("# SG") and all(q == a or (q, a) == (" ", "o") for q, a in zip(question, answer))
        assert int(rating) == answer.count("o") == shortest_distance(question, 12) - 1 >= 20

    builder.main(builder.parse_args(["--source-dir", str(runs["1"]), "--output-dir", str(tmp_path / "built")]))
    meta, arr = load_split(tmp_path / "built", "train")
    assert (meta["seq_len"], meta["vocab_size"], arr["inputs"].shape) == (144, 6, (16, 144))


def test_generator_rejects_impossible_path_length(tmp_path):
    args = generate_maze.parse_args(["--output-dir", str(tmp_path / "out"), "--num-train", "1", "--num-test", "1",
                                     "--size", "4", "--min-path-length", "15"])
    with pytest.raises(DatasetBuildError, match="min-path-length"):
        generate_maze.main(args)
    assert not (tmp_path / "out").exists()
