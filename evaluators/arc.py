"""ARC evaluator: maps every prediction on an augmented test input back to the original puzzle, votes over the
augmented versions, and reports pass@k plus a Kaggle `submission.json` (docs/compatibility.md section 10.3).

Same metrics and file format as the reference, with these fixes (docs/compatibility.md section 12, item 6):
- Works in a plain single process: predictions are gathered to rank 0 only when torch.distributed is
  initialized and world_size > 1 (over `group` if given, e.g. a gloo group for CPU object gathers).
- A test pair that received no prediction still appears in `submission.json` (both attempts `[[0]]`) instead of
  vanishing, and counts as a miss: in `ARC/pass@k` (as in the reference, which divides by all test pairs) and in
  `ARC/example_N` / `ARC/example_pass@k` (pairs without candidates are included in N).
- The crop is pure NumPy (no numba), same algorithm.

`aggregated_voting` (default True, as in the reference): the votes of every evaluation of a run are kept, so the
pass@k logged at an evaluation is that of an ensemble over all checkpoints evaluated so far (in one process's
lifetime: a resumed run starts a new ensemble). False: each evaluation votes only over its own predictions.
"""

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dataset.common import PuzzleDatasetMetadata, inverse_aug
from utils import distributed
from utils.errors import DataError, MissingInputError
from utils.atomic import atomic_path

GRID_SIDE = 30  # ARC sequences are a flattened 30x30 token canvas
# Token ids: 0 PAD, 1 EOS, 2..11 colours 0..9.
FIRST_COLOR_TOKEN, LAST_COLOR_TOKEN = 2, 11


def grid_hash(grid: np.ndarray) -> str:
    """SHA-256 of [rows, cols] bytes + the raw uint8 cells: grids of different shapes never collide."""
    assert grid.ndim == 2 and grid.dtype == np.uint8
    return hashlib.sha256(bytes(grid.shape) + grid.tobytes()).hexdigest()


def crop_grid(tokens: np.ndarray) -> np.ndarray:
    """Colours (uint8, 0..9) of the largest top-left rectangle of colour tokens in a 900-token canvas.

    The reference's scan: going down the rows, the width is the run of colour tokens from the left, never growing
    again once a row is narrower; keep the first (rows x width) of strictly largest area. A canvas starting with a
    non-colour token gives a 0x0 grid."""
    canvas = tokens.reshape(GRID_SIDE, GRID_SIDE)
    is_color = (canvas >= FIRST_COLOR_TOKEN) & (canvas <= LAST_COLOR_TOKEN)
    run_lengths = np.cumprod(is_color, axis=1).sum(axis=1)  # [30] leading colour tokens per row
    widths = np.minimum.accumulate(run_lengths)
    areas = np.arange(1, GRID_SIDE + 1) * widths
    if areas.max() == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    rows = int(np.argmax(areas)) + 1  # argmax returns the first maximum, as the strict '>' scan keeps
    return (canvas[:rows, : widths[rows - 1]] - FIRST_COLOR_TOKEN).astype(np.uint8)


def arc_grid_to_np(grid: List[List[int]]) -> np.ndarray:
    return np.array(grid, dtype=np.uint8)


# Per-rank voting state: grid hash -> grid, and base puzzle name -> input hash -> [(prediction hash, q), ...].
HashMap = Dict[str, np.ndarray]
Votes = Dict[str, Dict[str, List[Tuple[str, float]]]]


def _read_json(data_path: str, name: str):
    """One of the ARC builder's JSON files of the dataset folder."""
    path = os.path.join(data_path, name)
    if not os.path.isfile(path):
        raise MissingInputError(f"{path} is missing: the ARC evaluator needs a dataset built by "
                                "dataset/build_arc_dataset.py (for other tasks set evaluators=[])")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e}); rebuild the dataset with its builder") from None


class ARC:
    required_outputs = {"inputs", "puzzle_identifiers", "q_halt_logits", "preds"}
    # The constructor's settings (keys of its evaluators=[...] entry), as `python pretrain.py --help` lists them.
    CONFIG_HELP = {
        "submission_K": "attempts per test input written to submission.json (the top-voted predictions)",
        "pass_Ks": "the k of the logged ARC/pass@k metrics",
        "aggregated_voting": "keep the votes of every evaluation of the run (an ensemble over the checkpoints "
                             "evaluated so far); False: each evaluation votes over its own predictions",
    }

    def __init__(
        self,
        data_path: str,
        eval_metadata: PuzzleDatasetMetadata,
        submission_K: int = 2,
        pass_Ks: Sequence[int] = (1, 2, 5, 10, 100, 1000),
        aggregated_voting: bool = True,  # keep votes across evaluations; see the module docstring
    ):
        self.aggregated_voting = aggregated_voting
        self.submission_K = submission_K
        self.pass_Ks = tuple(pass_Ks)
        self.blank_identifier_id = eval_metadata.blank_identifier_id

        self.identifier_map: List[str] = _read_json(data_path, "identifiers.json")
        self.test_puzzles: Dict[str, dict] = _read_json(data_path, "test_puzzles.json")
        if not self.test_puzzles:
            raise DataError(f"{os.path.join(data_path, 'test_puzzles.json')} lists no test puzzles")

        self._clear_votes()
        self.begin_eval()

    def _clear_votes(self) -> None:
        self._hmap: HashMap = {}
        self._votes: Votes = {}

    def begin_eval(self) -> None:
        if not self.aggregated_voting:
            self._clear_votes()
        # Filled by `result` on rank 0: puzzle name -> {"pairs": test pairs, "pass@k": credit (hits / pairs), ...}.
        self.per_task: Dict[str, Dict[str, float]] = {}

    def update_batch(self, batch: Dict[str, torch.Tensor], preds: Dict[str, torch.Tensor]) -> None:
        """Record one batch of CPU tensors: inputs [B, 900], puzzle_identifiers [B], preds [B, 900],
        q_halt_logits [B] (each from `batch` or `preds`). Padding rows (blank identifier) are dropped."""
        outputs = {**batch, **preds}
        keep = outputs["puzzle_identifiers"] != self.blank_identifier_id
        identifiers = outputs["puzzle_identifiers"][keep].numpy()
        inputs = outputs["inputs"][keep].numpy()
        predictions = outputs["preds"][keep].numpy()
        q_values = outputs["q_halt_logits"][keep].to(torch.float64).sigmoid().numpy()

        for identifier, input_tokens, pred_tokens, q in zip(identifiers, inputs, predictions, q_values):
            base_name, inverse = inverse_aug(self.identifier_map[identifier])
            input_hash = grid_hash(inverse(crop_grid(input_tokens)))
            pred = inverse(crop_grid(pred_tokens))  # crop keeps colour tokens only, so values are 0..9
            pred_hash = grid_hash(pred)

            self._hmap[pred_hash] = pred
            self._votes.setdefault(base_name, {}).setdefault(input_hash, []).append((pred_hash, float(q)))

    def result(
        self, save_path: Optional[str], rank: int, world_size: int, group=None
    ) -> Optional[Dict[str, float]]:
        """Vote and score on rank 0; write `<save_path>/submission.json` there when `save_path` is given.
        Every rank must call this (it gathers); ranks other than 0 return None."""
        if world_size > 1:
            if not distributed.is_distributed():
                raise RuntimeError(f"ARC.result: world_size is {world_size} but torch.distributed is not initialized")
            gathered = distributed.gather_objects((self._hmap, self._votes), dst=0, group=group)
        else:
            gathered = [(self._hmap, self._votes)]
        if rank != 0:
            return None

        hmap: HashMap = {}
        for rank_hmap, _ in gathered:
            hmap.update(rank_hmap)

        submission: Dict[str, List[Dict[str, list]]] = {}
        puzzle_credit = np.zeros(len(self.pass_Ks))  # sum over puzzles of (pairs hit / pairs)
        pair_hits = np.zeros(len(self.pass_Ks))
        num_pairs = 0
        missing: List[str] = []
        for name, puzzle in self.test_puzzles.items():
            submission[name] = []
            hits = np.zeros(len(self.pass_Ks))
            for pair_index, pair in enumerate(puzzle["test"]):
                input_hash = grid_hash(arc_grid_to_np(pair["input"]))
                label_hash = grid_hash(arc_grid_to_np(pair["output"]))
                ranked = self._rank_candidates([votes.get(name, {}).get(input_hash, []) for _, votes in gathered])
                if not ranked:
                    missing.append(f"{name}[{pair_index}]")
                    submission[name].append({f"attempt_{i + 1}": [[0]] for i in range(self.submission_K)})
                    continue

                hits += [label_hash in ranked[:k] for k in self.pass_Ks]
                attempts = ranked[: self.submission_K]
                attempts += [attempts[0]] * (self.submission_K - len(attempts))  # pad by repeating the best
                submission[name].append({f"attempt_{i + 1}": hmap[h].tolist() for i, h in enumerate(attempts)})
            puzzle_credit += hits / len(puzzle["test"])
            self.per_task[name] = {"pairs": len(puzzle["test"]),
                                   **{f"pass@{k}": float(h) / len(puzzle["test"]) for k, h in zip(self.pass_Ks, hits)}}
            pair_hits += hits
            num_pairs += len(puzzle["test"])

        if missing:
            print(f"ARC: {len(missing)} test pair(s) without predictions, counted as misses: {', '.join(missing)}")
        if save_path is not None:
            self._write_submission(save_path, submission)

        metrics = {f"ARC/pass@{k}": float(c) / len(self.test_puzzles) for k, c in zip(self.pass_Ks, puzzle_credit)}
        metrics["ARC/example_N"] = num_pairs
        metrics.update({f"ARC/example_pass@{k}": float(h) / num_pairs for k, h in zip(self.pass_Ks, pair_hits)})
        return metrics

    @staticmethod
    def _rank_candidates(per_rank_votes: List[List[Tuple[str, float]]]) -> List[str]:
        """Prediction hashes ordered by vote count, then mean q, both descending. The sort is stable, so ties keep
        first-seen order (rank 0's predictions first, then batch order), as in the reference."""
        stats: Dict[str, List[float]] = {}  # hash -> [count, sum of q]
        for votes in per_rank_votes:
            for pred_hash, q in votes:
                entry = stats.setdefault(pred_hash, [0, 0.0])
                entry[0] += 1
                entry[1] += q
        return sorted(stats, key=lambda h: (stats[h][0], stats[h][1] / stats[h][0]), reverse=True)

    @staticmethod
    def _write_submission(save_path: str, submission: dict) -> None:
        with atomic_path(os.path.join(save_path, "submission.json")) as tmp, open(tmp, "w") as f:
            json.dump(submission, f)
