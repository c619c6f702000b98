"""ARC evaluator on three real evaluation puzzles: hand-made predictions on augmented versions, votes, pass@k and
submission.json checked against values worked out by hand; single process, under torchrun with 2 gloo ranks, and
across two successive evaluations with and without aggregated voting."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from dataset.common import PuzzleDatasetMetadata, dihedral_transform
from evaluators.arc import ARC, crop_grid
from tests.conftest import ENV, REPO, launch
from utils.errors import MissingInputError

KAGGLE = os.path.join(REPO, "kaggle", "combined", "arc-agi_evaluation")

A, B, C = "0c786b71", "3b4c2228", "e345f17b"  # A: 1 test pair (3x4 -> 6x8); B, C: 2 test pairs each
A1, A2, A3 = f"{A}|||t1|||0513284769", f"{A}|||t6|||0987654321", f"{A}|||t7|||0123456789"
B1, B2 = f"{B}|||t3|||0246813579", f"{B}|||t5|||0918273645"
C1 = f"{C}|||t4|||0864297531"
IDENTIFIERS = ["<blank>", A, A1, A2, A3, B, B1, B2, C1]


def load_puzzles():
    with open(KAGGLE + "_challenges.json") as f:
        challenges = json.load(f)
    with open(KAGGLE + "_solutions.json") as f:
        solutions = json.load(f)
    # test_puzzles.json: original puzzle with `output` added to each test pair. File order B, A, C on purpose.
    puzzles = {}
    for name in (B, A, C):
        puzzle = challenges[name]
        for pair, output in zip(puzzle["test"], solutions[name]):
            pair["output"] = output
        puzzles[name] = puzzle
    return puzzles


PUZZLES = load_puzzles()


def pair_grid(name, pair, field):
    return np.array(PUZZLES[name]["test"][pair][field], dtype=np.uint8)


def wrong(grid, delta):
    """A wrong answer: one cell recoloured."""
    grid = grid.copy()
    grid[0, 0] = (grid[0, 0] + delta) % 10
    return grid


def augment(grid, name):
    """Forward augmentation of a version name `<base>|||t<k>|||<perm>`: recolour, then dihedral transform."""
    if "|||" not in name:
        return grid
    _, trans, perm = name.split("|||")
    colour_map = np.array([int(d) for d in perm], dtype=np.uint8)
    return dihedral_transform(colour_map[grid], int(trans[1:]))


def encode(grid, rng=None):
    """Grid -> 900 tokens as the builder writes test inputs: colours + 2 at the top-left, EOS rails below and to the
    right. With `rng`, the area past the rails is filled with random colours, like a model's stray outputs."""
    h, w = grid.shape
    canvas = np.zeros((30, 30), dtype=np.int64)
    if rng is not None:
        canvas[:] = rng.integers(2, 12, size=(30, 30))
    canvas[:h, :w] = grid + 2
    canvas[h : h + 1, :w] = 1  # EOS row below the grid (none when h = 30)
    canvas[:h, w : w + 1] = 1  # EOS column right of the grid (none when w = 30)
    canvas[h : h + 1, w : w + 1] = 0  # the corner stays PAD
    return canvas.reshape(-1)


OUT_A = pair_grid(A, 0, "output")
OUT_B0, OUT_B1 = pair_grid(B, 0, "output"), pair_grid(B, 1, "output")
OUT_C0 = pair_grid(C, 0, "output")
W1, W2 = wrong(OUT_A, 1), OUT_B0[:-1]  # W2: wrong shape
W3, W4 = wrong(OUT_B1, 1), wrong(OUT_B1, 2)

# (version, test pair, prediction in the original frame, q_halt logit). Row order = first-seen order.
ROWS = [
    # A pair 0: correct and W1 get 2 votes each; W1 has the higher mean sigmoid(q) -> ranked [W1, correct].
    (A, 0, OUT_A, 0.0),
    (A1, 0, W1, 2.0),
    (A2, 0, W1, 1.0),
    (A3, 0, OUT_A, -1.0),
    # B pair 0: correct 2 votes, W2 1 vote with a high q -> [correct, W2].
    (B, 0, OUT_B0, 0.0),
    (B1, 0, OUT_B0, -3.0),
    (B2, 0, W2, 5.0),
    # B pair 1: one vote each; W4 has the highest q, W3 and correct tie on q and W3 was seen first
    # -> [W4, W3, correct]: hit only from pass@5 on.
    (B, 1, W3, 1.0),
    (B1, 1, OUT_B1, 1.0),
    (B2, 1, W4, 3.0),
    # C pair 0: a single candidate, correct -> attempts [correct, correct]. C pair 1: no prediction at all.
    (C1, 0, OUT_C0, 0.3),
]

EXPECTED_METRICS = {
    # Puzzle credit A, B, C: pass@1 0, 1/2, 1/2; pass@2 1, 1/2, 1/2; pass@5+ 1, 1, 1/2.
    "ARC/pass@1": 1 / 3,
    "ARC/pass@2": 2 / 3,
    **{f"ARC/pass@{k}": 2.5 / 3 for k in (5, 10, 100, 1000)},
    "ARC/example_N": 5,
    # Pair hits (A0, B0, B1, C0, C1): pass@1 0 1 0 1 0; pass@2 1 1 0 1 0; pass@5+ 1 1 1 1 0.
    "ARC/example_pass@1": 2 / 5,
    "ARC/example_pass@2": 3 / 5,
    **{f"ARC/example_pass@{k}": 4 / 5 for k in (5, 10, 100, 1000)},
}

EXPECTED_SUBMISSION = {
    B: [
        {"attempt_1": OUT_B0.tolist(), "attempt_2": W2.tolist()},
        {"attempt_1": W4.tolist(), "attempt_2": W3.tolist()},
    ],
    A: [{"attempt_1": W1.tolist(), "attempt_2": OUT_A.tolist()}],
    C: [
        {"attempt_1": OUT_C0.tolist(), "attempt_2": OUT_C0.tolist()},
        {"attempt_1": [[0]], "attempt_2": [[0]]},  # no candidates: kept, counted as a miss
    ],
}

METADATA = PuzzleDatasetMetadata(
    pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=12, seq_len=900,
    num_puzzle_identifiers=len(IDENTIFIERS), total_groups=3, mean_puzzle_examples=1.0, total_puzzles=8, sets=["all"],
)


def make_rows(rows, num_blank=0):
    """Model outputs for `rows` (+ `num_blank` padding rows with identifier 0), as the eval loop hands them over."""
    rng = np.random.default_rng(0)
    inputs, preds, identifiers, q = [], [], [], []
    for version, pair, pred, q_logit in rows:
        base = version.split("|||")[0]
        inputs.append(encode(augment(pair_grid(base, pair, "input"), version)))
        preds.append(encode(augment(pred, version), rng))
        identifiers.append(IDENTIFIERS.index(version))
        q.append(q_logit)
    for _ in range(num_blank):
        inputs.append(rng.integers(0, 12, size=900))
        preds.append(rng.integers(0, 12, size=900))
        identifiers.append(0)
        q.append(10.0)
    return {
        "inputs": torch.tensor(np.stack(inputs), dtype=torch.int32),
        "puzzle_identifiers": torch.tensor(identifiers, dtype=torch.int32),
        "preds": torch.tensor(np.stack(preds), dtype=torch.int64),
        "q_halt_logits": torch.tensor(q, dtype=torch.float32),
    }


def feed(evaluator, outputs):
    evaluator.update_batch(
        {k: outputs[k] for k in ("inputs", "puzzle_identifiers")}, {k: outputs[k] for k in ("preds", "q_halt_logits")}
    )


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("arc_data")
    with open(root / "identifiers.json", "w") as f:
        json.dump(IDENTIFIERS, f)
    with open(root / "test_puzzles.json", "w") as f:
        json.dump(PUZZLES, f)
    (root / "test").mkdir()
    with open(root / "test" / "dataset.json", "w") as f:
        json.dump(METADATA.model_dump(), f)
    return str(root)


def read_submission(save_path):
    with open(os.path.join(save_path, "submission.json")) as f:
        return json.load(f)


def test_fixture_inputs_are_distinct():
    # Votes are keyed by input hash: the test pairs of a puzzle must differ for the expectations above to hold.
    for name in (B, C):
        assert PUZZLES[name]["test"][0]["input"] != PUZZLES[name]["test"][1]["input"]


def test_single_process(data_path, tmp_path):
    evaluator = ARC(data_path, METADATA)
    evaluator.begin_eval()
    # Two batches, each ending in padding rows, as the eval loop delivers them.
    feed(evaluator, make_rows(ROWS[:6], num_blank=2))
    feed(evaluator, make_rows(ROWS[6:], num_blank=3))
    metrics = evaluator.result(str(tmp_path), rank=0, world_size=1)

    assert metrics.keys() == EXPECTED_METRICS.keys()
    assert metrics == pytest.approx(EXPECTED_METRICS)
    submission = read_submission(tmp_path)
    assert submission == EXPECTED_SUBMISSION
    assert list(submission) == [B, A, C]  # test_puzzles.json order
    assert not [f for f in os.listdir(tmp_path) if f != "submission.json"]  # no temporary file left behind


def test_successive_evaluations_do_not_leak_votes_without_aggregated_voting(data_path, tmp_path):
    evaluator = ARC(data_path, METADATA, aggregated_voting=False)
    evaluator.begin_eval()
    feed(evaluator, make_rows(ROWS))
    evaluator.result(None, rank=0, world_size=1)

    # Second evaluation sees only W1 for A: alone it must rank first, B and C have no candidates.
    evaluator.begin_eval()
    feed(evaluator, make_rows([ROWS[1]]))
    metrics = evaluator.result(str(tmp_path), rank=0, world_size=1)

    fresh = ARC(data_path, METADATA, aggregated_voting=False)
    feed(fresh, make_rows([ROWS[1]]))
    assert metrics == fresh.result(None, rank=0, world_size=1)
    assert metrics["ARC/pass@1000"] == 0.0 and metrics["ARC/example_N"] == 5
    assert read_submission(tmp_path) == {
        B: [{"attempt_1": [[0]], "attempt_2": [[0]]}] * 2,
        A: [{"attempt_1": W1.tolist(), "attempt_2": W1.tolist()}],
        C: [{"attempt_1": [[0]], "attempt_2": [[0]]}] * 2,
    }


SECOND_EVAL = [(A, 0, OUT_A, 0.0)]  # one more vote for A's correct answer


def two_evaluations(data_path, aggregated_voting):
    evaluator = ARC(data_path, METADATA, aggregated_voting=aggregated_voting)
    results = []
    for rows in (ROWS, SECOND_EVAL):
        evaluator.begin_eval()
        feed(evaluator, make_rows(rows))
        results.append(evaluator.result(None, rank=0, world_size=1))
    return results


def test_aggregated_voting_keeps_votes_across_evaluations(data_path):
    first, second = two_evaluations(data_path, aggregated_voting=True)
    assert first == pytest.approx(EXPECTED_METRICS)
    # Second evaluation votes over both: A's correct answer now has 3 votes to W1's 2 and ranks first, so A's
    # credit is 1 from pass@1 on; B and C keep their first-evaluation candidates (credit 1/2, 1/2 from pass@1).
    assert second == pytest.approx({
        "ARC/pass@1": 2 / 3, "ARC/pass@2": 2 / 3, **{f"ARC/pass@{k}": 2.5 / 3 for k in (5, 10, 100, 1000)},
        "ARC/example_N": 5,
        # Pair hits (A0, B0, B1, C0, C1): pass@1 and @2: 1 1 0 1 0; pass@5+: 1 1 1 1 0.
        "ARC/example_pass@1": 3 / 5, "ARC/example_pass@2": 3 / 5,
        **{f"ARC/example_pass@{k}": 4 / 5 for k in (5, 10, 100, 1000)},
    })


def test_without_aggregated_voting_each_evaluation_votes_alone(data_path):
    first, second = two_evaluations(data_path, aggregated_voting=False)
    assert first == pytest.approx(EXPECTED_METRICS)
    # Only A's correct answer: A credit 1, B and C no candidates.
    assert second == pytest.approx({**{f"ARC/pass@{k}": 1 / 3 for k in (1, 2, 5, 10, 100, 1000)}, "ARC/example_N": 5,
                                    **{f"ARC/example_pass@{k}": 1 / 5 for k in (1, 2, 5, 10, 100, 1000)}})


def test_aggregated_voting_is_on_by_default(data_path):
    assert ARC(data_path, METADATA).aggregated_voting is True


def test_torchrun_two_ranks_match_single_process(data_path, tmp_path):
    # Rank r feeds the r-th half of the rows, so the gathered first-seen order equals the single-process one.
    outputs = make_rows(ROWS, num_blank=1)  # 12 rows, 6 per rank; the padding row lands on rank 1
    batch_path = tmp_path / "rows.pt"
    torch.save(outputs, batch_path)
    out_dir = tmp_path / "out"

    worker = os.path.join(REPO, "tests", "arc_dist_worker.py")
    cmd = launch(worker, nproc=2) + [data_path, str(batch_path), str(out_dir)]
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    with open(out_dir / "result.json") as f:
        metrics = json.load(f)
    assert metrics == pytest.approx(EXPECTED_METRICS)
    assert read_submission(out_dir) == EXPECTED_SUBMISSION


def test_a_folder_without_the_arc_files_is_refused_in_one_line(tmp_path):
    with pytest.raises(MissingInputError, match=r"identifiers\.json is missing: the ARC evaluator needs a dataset "
                                                r"built by dataset/build_arc_dataset\.py \(for other tasks set "
                                                r"evaluators=\[\]\)"):
        ARC(str(tmp_path), METADATA)


def test_world_size_above_one_needs_a_process_group(data_path):
    with pytest.raises(RuntimeError, match="not initialized"):
        ARC(data_path, METADATA).result(None, rank=0, world_size=2)


def reference_crop(tokens):
    """The reference's loop, verbatim in behaviour: the oracle for the vectorised crop."""
    grid = tokens.reshape(30, 30)
    max_area, max_size, num_c = 0, (0, 0), 30
    for num_r in range(1, 31):
        for c in range(1, num_c + 1):
            x = grid[num_r - 1, c - 1]
            if x < 2 or x > 11:
                num_c = c - 1
                break
        if num_r * num_c > max_area:
            max_area, max_size = num_r * num_c, (num_r, num_c)
    return (grid[: max_size[0], : max_size[1]] - 2).astype(np.uint8)


def test_crop_matches_reference_loop():
    rng = np.random.default_rng(1)
    canvases = [np.full(900, 5), np.zeros(900, dtype=np.int64), encode(np.zeros((30, 30), dtype=np.uint8))]
    for _ in range(300):
        h, w = rng.integers(1, 31, size=2)
        canvas = encode(rng.integers(0, 10, size=(h, w)).astype(np.uint8), rng).reshape(30, 30)
        # Knock out a few cells anywhere, so rows narrower than the grid and late wider rows occur.
        cells = rng.integers(0, 30, size=(rng.integers(0, 4), 2))
        canvas[cells[:, 0], cells[:, 1]] = rng.choice([0, 1, 12])
        canvases.append(canvas.reshape(-1))
    for canvas in canvases:
        got, expected = crop_grid(canvas), reference_crop(canvas)
        assert got.dtype == np.uint8 and got.shape == expected.shape and np.array_equal(got, expected)
