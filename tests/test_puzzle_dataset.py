"""Tests of puzzle_dataset.py on small datasets written here in the on-disk format (docs/compatibility.md section 1)."""

import json
import os
import warnings

import numpy as np
import pytest
import torch

from dataset.common import PuzzleDatasetMetadata, save_split
from puzzle_dataset import IGNORE_LABEL_ID, PuzzleDataset, PuzzleDatasetConfig, create_dataloader, load_metadata

SEQ_LEN = 4
# Examples per puzzle, per group: 7 groups of 1-3 puzzles. VARYING differs within groups; UNIFORM does not
# (as every builder's output), which also makes the rows of a pass predictable from the group order alone.
VARYING = [[3], [1, 2], [2, 4, 1], [5], [1, 1], [2], [3, 1, 2]]
UNIFORM = [[3], [1, 1], [2, 2, 2], [5], [1, 1], [2], [3, 3, 3]]


def write_dataset(root, groups=UNIFORM, splits=("train", "test"), tag=0, seq_len=SEQ_LEN, ignore_label_id=0):
    """Example row r: inputs [r + 1, tag, 5, 5] (never the pad id 0), labels [0, r % 3 + 1, 0, 9]; puzzle p has
    identifier p + 1 (0 is the blank)."""
    sizes = [size for group in groups for size in group]
    num_examples = sum(sizes)
    rows = np.arange(num_examples)
    inputs = np.zeros((num_examples, seq_len), np.uint8)
    inputs[:, 0], inputs[:, 1], inputs[:, 2:] = rows + 1, tag, 5
    labels = np.zeros((num_examples, seq_len), np.uint8)
    labels[:, 1], labels[:, 3:] = rows % 3 + 1, 9
    arrays = {"all": {
        "inputs": inputs,
        "labels": labels,
        "puzzle_identifiers": np.arange(1, len(sizes) + 1, dtype=np.int32),
        "puzzle_indices": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32),
        "group_indices": np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(np.int32),
    }}
    metadata = PuzzleDatasetMetadata(
        pad_id=0, ignore_label_id=ignore_label_id, blank_identifier_id=0, vocab_size=10, seq_len=seq_len,
        num_puzzle_identifiers=len(sizes) + 1, total_groups=len(groups), mean_puzzle_examples=num_examples / len(sizes),
        total_puzzles=len(sizes), sets=["all"],
    )
    for split in splits:
        save_split(str(root), split, metadata, arrays)
    return arrays["all"]


def make_config(paths, G=4, test=False, epochs=1, seed=0, rank=0, W=1):
    return PuzzleDatasetConfig(seed=seed, dataset_paths=[str(p) for p in paths], global_batch_size=G,
                               test_set_mode=test, epochs_per_iter=epochs, rank=rank, num_replicas=W)


def collect(dataset, rounds=1):
    return [item for _ in range(rounds) for item in dataset]


def batches_per_pass(config, rounds):
    """Batches in train passes 1, 2, ... of an uninterrupted run: each round over the dataset is one pass per set."""
    dataset = PuzzleDataset(config)
    counts = []
    for _ in range(rounds):
        names = [set_name for set_name, _, _ in dataset]
        counts += [names.count(set_name) for set_name in dataset.metadata.sets]
    return counts


def example_rows(batch):
    """Example row of each non-padding row of a batch (inputs[:, 0] = row + 1; padding has 0)."""
    rows = batch["inputs"][:, 0].numpy().astype(np.int64) - 1
    return rows[rows >= 0]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (set_a, batch_a, eff_a), (set_b, batch_b, eff_b) in zip(a, b):
        assert (set_a, eff_a) == (set_b, eff_b)
        for key in batch_a:
            assert torch.equal(batch_a[key], batch_b[key]), key


@pytest.fixture
def uniform(tmp_path):
    return tmp_path / "uniform", write_dataset(tmp_path / "uniform", UNIFORM)


@pytest.fixture
def varying(tmp_path):
    return tmp_path / "varying", write_dataset(tmp_path / "varying", VARYING)


def test_test_mode_batch_shapes_dtypes_padding_and_labels(varying):
    path, arrays = varying
    batches = collect(PuzzleDataset(make_config([path], G=8, test=True), "test"))
    num_examples = len(arrays["inputs"])  # 28: three windows of 8, then one of 4
    assert [eff for _, _, eff in batches] == [8, 8, 8, 4]
    for set_name, batch, eff in batches:
        assert set_name == "all"
        assert batch["inputs"].shape == (8, SEQ_LEN) and batch["inputs"].dtype == torch.int32
        assert batch["labels"].shape == (8, SEQ_LEN) and batch["labels"].dtype == torch.int32
        assert batch["puzzle_identifiers"].shape == (8,) and batch["puzzle_identifiers"].dtype == torch.int32
        rows = example_rows(batch)
        assert len(rows) == eff
        # Real rows: inputs as stored, labels 0 -> -100, the identifier of the row's puzzle.
        assert np.array_equal(batch["inputs"][:eff].numpy(), arrays["inputs"][rows])
        expected_labels = arrays["labels"][rows].astype(np.int32)
        expected_labels[expected_labels == 0] = IGNORE_LABEL_ID
        assert np.array_equal(batch["labels"][:eff].numpy(), expected_labels)
        puzzles = np.searchsorted(arrays["puzzle_indices"], rows, side="right") - 1
        assert np.array_equal(batch["puzzle_identifiers"][:eff].numpy(), arrays["puzzle_identifiers"][puzzles])
        # Padding rows: pad id, ignore label, blank identifier.
        assert (batch["inputs"][eff:] == 0).all() and (batch["labels"][eff:] == IGNORE_LABEL_ID).all()
        assert (batch["puzzle_identifiers"][eff:] == 0).all()
    assert np.array_equal(np.concatenate([example_rows(b) for _, b, _ in batches]), np.arange(num_examples))


def test_labels_untouched_without_ignore_label(tmp_path):
    arrays = write_dataset(tmp_path, ignore_label_id=None)
    (_, batch, eff), *_ = PuzzleDataset(make_config([tmp_path], G=32, test=True), "test")
    assert np.array_equal(batch["labels"][:eff].numpy(), arrays["labels"])
    assert (batch["labels"][eff:] == IGNORE_LABEL_ID).all()


@pytest.mark.parametrize("W", [1, 2, 3])
def test_test_mode_covers_every_example_once_across_ranks(varying, W):
    path, arrays = varying
    G = 6
    per_rank = [collect(PuzzleDataset(make_config([path], G=G, test=True, rank=r, W=W), "test")) for r in range(W)]
    num_examples = len(arrays["inputs"])
    windows = [min(G, num_examples - start) for start in range(0, num_examples, G)]
    for batches in per_rank:
        assert [eff for _, _, eff in batches] == windows
        assert all(b["inputs"].shape == (G // W, SEQ_LEN) for _, b, _ in batches)
    rows = np.concatenate([example_rows(b) for window in zip(*per_rank) for _, b, _ in window])
    assert np.array_equal(rows, np.arange(num_examples))
    if W == 3:  # the last window (4 rows) fills ranks 0 and 1 and leaves rank 2 all padding
        assert (per_rank[2][-1][1]["puzzle_identifiers"] == 0).all() and (per_rank[2][-1][1]["inputs"] == 0).all()


def row_puzzles(arrays, rows):
    return np.searchsorted(arrays["puzzle_indices"], rows, side="right") - 1


@pytest.mark.parametrize("epochs", [1, 3])
@pytest.mark.parametrize("G", [4, 5])
def test_train_pass_follows_group_order_one_puzzle_per_group(uniform, epochs, G):
    """The rows of a pass come group by group in the order of `epochs` Philox(seed + 1) permutations: one puzzle
    of each group, its examples distinct, the puzzle that overflows a batch truncated, the final partial batch
    dropped."""
    path, arrays = uniform
    seed = 5
    batches = collect(PuzzleDataset(make_config([path], G=G, epochs=epochs, seed=seed)))
    assert batches and all(eff == G and set_name == "all" for set_name, _, eff in batches)
    stream = [example_rows(b) for _, b, _ in batches]
    assert all(len(rows) == G for rows in stream)  # train batches are full: no padding

    num_groups = len(UNIFORM)
    rng = np.random.Generator(np.random.Philox(seed=seed + 1))
    group_order = np.concatenate([rng.permutation(num_groups) for _ in range(epochs)])
    group_indices, puzzle_sizes = arrays["group_indices"], np.diff(arrays["puzzle_indices"])
    position = 0
    for rows in stream:
        filled = 0
        while filled < G:
            group = group_order[position]
            position += 1
            puzzle = row_puzzles(arrays, rows[filled])
            assert group_indices[group] <= puzzle < group_indices[group + 1]
            take = min(puzzle_sizes[puzzle], G - filled)
            segment = rows[filled: filled + take]
            assert (row_puzzles(arrays, segment) == puzzle).all()
            assert len(set(segment.tolist())) == take  # without replacement
            filled += take
    # What is left of the pass cannot fill a batch (UNIFORM: a group's size does not depend on the puzzle).
    left = sum(puzzle_sizes[group_indices[g]] for g in group_order[position:])
    assert left < G


def test_every_puzzle_of_a_group_gets_drawn(varying):
    path, arrays = varying
    dataset = PuzzleDataset(make_config([path], G=4, epochs=2))
    seen = {int(p) for _, b, _ in collect(dataset, rounds=30) for p in row_puzzles(arrays, example_rows(b))}
    assert seen == set(range(len(arrays["puzzle_identifiers"])))


def test_train_identifiers_and_labels_match_rows(varying):
    path, arrays = varying
    for _, batch, _ in collect(PuzzleDataset(make_config([path], G=4, epochs=2))):
        rows = example_rows(batch)
        assert np.array_equal(batch["puzzle_identifiers"].numpy(), arrays["puzzle_identifiers"][row_puzzles(arrays, rows)])
        expected_labels = arrays["labels"][rows].astype(np.int32)
        expected_labels[expected_labels == 0] = IGNORE_LABEL_ID
        assert np.array_equal(batch["labels"].numpy(), expected_labels)


@pytest.mark.parametrize("test", [False, True])
def test_rank_slices_concatenate_to_the_global_batch(varying, test):
    path, _ = varying
    split = "test" if test else "train"
    whole = collect(PuzzleDataset(make_config([path], G=6, test=test, epochs=2), split), rounds=2)
    halves = [collect(PuzzleDataset(make_config([path], G=6, test=test, epochs=2, rank=r, W=2), split), rounds=2)
              for r in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(whole)
    for (set_name, batch, eff), first, second in zip(whole, *halves):
        assert first[0] == second[0] == set_name and first[2] == second[2] == eff
        for key in batch:
            assert torch.equal(torch.cat([first[1][key], second[1][key]]), batch[key]), key


def test_seed_determines_the_batches(varying):
    path, _ = varying
    run = lambda seed: collect(PuzzleDataset(make_config([path], G=4, epochs=3, seed=seed)), rounds=2)
    assert_same_batches(run(7), run(7))
    first, other = run(7), run(8)
    assert any(not torch.equal(a[1]["inputs"], b[1]["inputs"]) for a, b in zip(first, other))


def test_passes_differ(varying):
    path, _ = varying
    dataset = PuzzleDataset(make_config([path], G=4, epochs=3))
    first, second = collect(dataset), collect(dataset)
    assert any(not torch.equal(a[1]["inputs"], b[1]["inputs"]) for a, b in zip(first, second))


def test_examples_are_seeded_not_drawn_from_the_global_rng(varying):
    path, _ = varying
    make = lambda: PuzzleDataset(make_config([path], G=4, epochs=3))
    np.random.seed(1)
    first = collect(make())
    np.random.seed(2)
    assert_same_batches(first, collect(make()))


@pytest.mark.parametrize("test", [False, True])
def test_batches_independent_of_num_workers(varying, test):
    path, _ = varying
    config = make_config([path], G=4, test=test, epochs=2)
    split = "test" if test else "train"
    results = []
    for num_workers in (0, 1):
        loader, metadata = create_dataloader(config, split, num_workers=num_workers)
        results.append([item for _ in range(2) for item in loader])  # two rounds: the worker keeps the pass count
    assert metadata.sets == ["all"]
    assert_same_batches(*results)


def test_multiple_paths_merge(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    arrays_a = write_dataset(first, UNIFORM, tag=1)
    arrays_b = write_dataset(second, VARYING, tag=2)
    dataset = PuzzleDataset(make_config([first, second], G=4))
    metadata = dataset.metadata
    assert metadata.sets == ["all", "all1"]
    num_puzzles = len(arrays_a["puzzle_identifiers"]) + len(arrays_b["puzzle_identifiers"])
    assert metadata.total_puzzles == num_puzzles and metadata.total_groups == 2 * len(UNIFORM)
    assert metadata.num_puzzle_identifiers == num_puzzles + 2  # summed (each path counts its blank)
    assert metadata.mean_puzzle_examples == pytest.approx(
        (len(arrays_a["inputs"]) + len(arrays_b["inputs"])) / num_puzzles)

    batches = collect(dataset)
    set_names = [s for s, _, _ in batches]
    assert set_names == sorted(set_names) and set(set_names) == {"all", "all1"}  # one pass of `all`, then `all1`
    for set_name, batch, _ in batches:
        assert (batch["inputs"][:, 1] == (1 if set_name == "all" else 2)).all()

    test_batches = collect(PuzzleDataset(make_config([first, second], G=32, test=True), "test"))
    assert [(s, eff) for s, _, eff in test_batches] == [("all", len(arrays_a["inputs"])), ("all1", len(arrays_b["inputs"]))]


def test_mismatched_metadata_is_refused(tmp_path):
    write_dataset(tmp_path / "a")
    write_dataset(tmp_path / "b", seq_len=6)
    with pytest.raises(ValueError, match=r"b has seq_len=6 but .*a has 4"):
        PuzzleDataset(make_config([tmp_path / "a", tmp_path / "b"]))


@pytest.mark.parametrize("groups", [UNIFORM, VARYING])
@pytest.mark.parametrize("epochs", [1, 4])
def test_batches_in_pass_counts_the_batches(tmp_path, groups, epochs):
    write_dataset(tmp_path / "a", groups)
    write_dataset(tmp_path / "b", VARYING)
    config = make_config([tmp_path / "a", tmp_path / "b"], G=5, epochs=epochs)
    counts = [PuzzleDataset(config).batches_in_pass(p) for p in range(1, 7)]  # before iterating: no worker state
    assert counts == batches_per_pass(config, rounds=3)


@pytest.mark.parametrize("passes_done, batches_done", [(0, 2), (1, 0), (1, 3), (2, 1), (3, 2)])
def test_resume_continues_exactly(tmp_path, passes_done, batches_done):
    """A run stopped after `passes_done` passes and `batches_done` more batches; a fresh dataset resumed there
    yields what the uninterrupted run yields next (two paths: the pass alternates between `all` and `all1`)."""
    write_dataset(tmp_path / "a", VARYING, tag=1)
    write_dataset(tmp_path / "b", UNIFORM, tag=2)
    config = make_config([tmp_path / "a", tmp_path / "b"], G=4, epochs=2, seed=3)
    uninterrupted = collect(PuzzleDataset(config), rounds=3)
    num_sets = 2
    consumed = sum(batches_per_pass(config, rounds=3)[:passes_done]) + batches_done

    resumed = PuzzleDataset(config)
    resumed.set_resume_position(passes_done, batches_done)
    # The interrupted iteration finishes first, then whole iterations follow.
    rounds_left = 3 - passes_done // num_sets
    assert_same_batches(collect(resumed, rounds=rounds_left), uninterrupted[consumed:])


def test_resume_through_a_loader_worker(varying):
    path, _ = varying
    config = make_config([path], G=4, epochs=3, seed=1)
    uninterrupted = collect(PuzzleDataset(config), rounds=3)
    loader, _ = create_dataloader(config, "train", num_workers=1)
    loader.load_state_dict({"passes_done": 1, "batches_done": 2})  # before the first iterator: the worker gets a copy
    assert loader.next_iteration == 1
    resumed = [item for _ in range(2) for item in loader]
    consumed = batches_per_pass(config, rounds=1)[0] + 2
    assert_same_batches(resumed, uninterrupted[consumed:])
    assert loader.state_dict() == {"passes_done": 3, "batches_done": 0} and loader.next_iteration == 3
    with pytest.raises(ValueError, match="before the loader's first iteration"):
        loader.load_state_dict({"passes_done": 0, "batches_done": 0})


@pytest.mark.parametrize("stop_after", [1, 6, 9, 12, 14, 27])
def test_loader_reports_its_position_and_restarts_there(tmp_path, stop_after):
    """After any batch it handed out (the `stop_after`-th: mid-pass, last of a pass or of an iteration), the loader's
    state_dict is its position, and a fresh loader given it yields the rest of the uninterrupted run (two paths:
    the passes alternate between `all` and `all1`)."""
    write_dataset(tmp_path / "a", VARYING, tag=1)
    write_dataset(tmp_path / "b", UNIFORM, tag=2)
    config = make_config([tmp_path / "a", tmp_path / "b"], G=4, epochs=2, seed=3)
    rounds = 3
    uninterrupted = collect(PuzzleDataset(config), rounds=rounds)
    ends = np.cumsum(batches_per_pass(config, rounds=rounds))  # batches handed out by the end of each pass

    loader, _ = create_dataloader(config, "train", num_workers=0)
    seen = []
    while len(seen) < stop_after:
        for item in loader:
            seen.append(item)
            if len(seen) == stop_after:
                break
    position = loader.state_dict()
    current_pass = int(np.searchsorted(ends, stop_after))  # 0-based pass of the last batch handed out
    assert position == {"passes_done": current_pass,
                        "batches_done": stop_after - (int(ends[current_pass - 1]) if current_pass else 0)}

    resumed, _ = create_dataloader(config, "train", num_workers=0)
    resumed.load_state_dict(position)
    assert resumed.next_iteration == current_pass // 2
    rest = [item for _ in range(resumed.next_iteration, rounds) for item in resumed]
    assert_same_batches(seen + rest, uninterrupted)


def test_bad_inputs_raise_one_clear_line(tmp_path):
    write_dataset(tmp_path / "ok", splits=("train",))
    checks = [
        (make_config([tmp_path / "ok"], G=5, W=2), ValueError, "not divisible by the number of processes 2"),
        (make_config([tmp_path / "missing"]), FileNotFoundError, r"missing does not exist; build it first with a builder, e\.g\. "
                                                                  r"`python dataset/build_sudoku_dataset\.py"),
        (make_config([tmp_path / "ok"], test=True), FileNotFoundError, r"has no test/ split folder"),
        (make_config([tmp_path / "ok"], rank=2, W=2), ValueError, "rank 2 is not in"),
    ]
    for config, error, message in checks:
        with pytest.raises(error, match=message) as info:
            PuzzleDataset(config, "test" if config.test_set_mode else "train")
        assert "\n" not in str(info.value)

    os.remove(tmp_path / "ok" / "train" / "all__labels.npy")
    with pytest.raises(FileNotFoundError, match=r"all__labels\.npy is missing"):
        PuzzleDataset(make_config([tmp_path / "ok"]))
    os.remove(tmp_path / "ok" / "train" / "dataset.json")
    with pytest.raises(FileNotFoundError, match=r"dataset\.json is missing; build it first"):
        PuzzleDataset(make_config([tmp_path / "ok"]))
    with open(tmp_path / "ok" / "train" / "dataset.json", "w") as f:
        json.dump({"pad_id": 0}, f)
    with pytest.raises(ValueError, match=r"is not a valid dataset\.json \(ignore_label_id: Field required\)"):
        PuzzleDataset(make_config([tmp_path / "ok"]))


def test_dataset_json_with_unknown_keys_loads_with_a_warning(tmp_path):
    # Forks' builders add keys of their own; the known ones are read, the others ignored (with a warning).
    write_dataset(tmp_path / "ok", splits=("train",))
    json_path = tmp_path / "ok" / "train" / "dataset.json"
    with open(json_path) as f:
        raw = json.load(f)
    with open(json_path, "w") as f:
        json.dump({**raw, "fork_version": "2.1", "augmentations": {"dihedral": True}}, f)
    with pytest.warns(UserWarning, match=r"dataset\.json: ignoring unknown key\(s\) augmentations, fork_version"):
        metadata = load_metadata(str(tmp_path / "ok"), "train")
    assert metadata.model_dump() == raw
    with pytest.warns(UserWarning):
        batches = list(PuzzleDataset(make_config([tmp_path / "ok"])))
    assert batches

    # Missing and wrong-typed known keys are still refused.
    for broken, message in (({k: v for k, v in raw.items() if k != "seq_len"}, r"seq_len: Field required"),
                            ({**raw, "vocab_size": "ten", "extra": 1}, r"vocab_size: Input should be a valid integer")):
        with open(json_path, "w") as f:
            json.dump(broken, f)
        with pytest.raises(ValueError, match=r"is not a valid dataset\.json \(" + message) as info:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_metadata(str(tmp_path / "ok"), "train")
        assert "\n" not in str(info.value)
    with open(json_path, "w") as f:
        json.dump([raw], f)
    with pytest.raises(ValueError, match="a JSON object is expected"):
        load_metadata(str(tmp_path / "ok"), "train")


def test_misuse_is_refused(tmp_path):
    write_dataset(tmp_path)
    with pytest.raises(ValueError, match="num_workers must be 0 or 1"):
        create_dataloader(make_config([tmp_path]), "train", num_workers=2)
    test_dataset = PuzzleDataset(make_config([tmp_path], test=True), "test")
    with pytest.raises(ValueError, match="applies to train mode"):
        test_dataset.set_resume_position(1, 0)
    with pytest.raises(ValueError, match="applies to train mode"):
        test_dataset.batches_in_pass(1)
