"""What the model believes after each ACT step, for a few puzzles: the runner's browser JSON, the local demo server
and the Modal app all call these functions. Grids are given and returned in display values (Sudoku digits with
0 = blank, maze tokens, ARC colours), converted to and from the dataset's tokens here and nowhere else."""

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from dataset.common import IGNORE_LABEL_ID, PuzzleDatasetMetadata
from evaluators.arc import crop_grid
from training.checkpoint import unwrap
from utils.atomic import atomic_write_text
from utils.errors import InputError

VISUALIZER_JSON = "visualizer.json"  # written by scripts/run_eval_only.py beside step_0_all_preds.<rank>
JSON_FORMAT = "trm-act-steps"

# Token layouts of the three tasks (the builders' vocabularies).
SUDOKU_DIGIT_OFFSET = 1  # token = digit + 1; digit 0 = blank
ARC_PAD, ARC_EOS, ARC_COLOUR_OFFSET, ARC_SIDE = 0, 1, 2, 30
MAZE_INPUT_TOKENS = (1, 2, 3, 4)  # wall, open, start, goal (5 = path, only in labels and predictions)


class GridError(InputError):
    """A grid or request the model cannot take; the message says what is wrong and what is expected."""


def task_kind(metadata: PuzzleDatasetMetadata) -> str:
    """'sudoku', 'maze' or 'arc', from the vocabulary and sequence length the builders write."""
    kinds = {(11, 81): "sudoku", (6, 900): "maze", (12, 900): "arc"}
    kind = kinds.get((metadata.vocab_size, metadata.seq_len))
    if kind is None:
        raise GridError(f"vocabulary {metadata.vocab_size} with sequence length {metadata.seq_len} is none of "
                        "Sudoku (11, 81), maze (6, 900) or ARC (12, 900)")
    return kind


def grid_side(metadata: PuzzleDatasetMetadata) -> int:
    return math.isqrt(metadata.seq_len)


def tokens_to_grid(kind: str, tokens: np.ndarray) -> List[List[int]]:
    """One row of tokens [L] -> display grid (list of rows). ARC: the top-left colour block, as the evaluator crops."""
    tokens = np.asarray(tokens).astype(np.int64)
    if kind == "arc":
        return crop_grid(np.clip(tokens, 0, 255).astype(np.uint8)).astype(int).tolist()
    side = math.isqrt(tokens.size)
    grid = tokens.reshape(side, side)
    if kind == "sudoku":
        grid = np.clip(grid - SUDOKU_DIGIT_OFFSET, 0, 9)  # PAD (0) shows as blank
    return grid.tolist()


def _as_int_grid(grid, what: str) -> np.ndarray:
    if not isinstance(grid, list) or not grid or not all(isinstance(row, list) for row in grid):
        raise GridError(f"{what} must be a non-empty list of rows (lists of integers)")
    widths = {len(row) for row in grid}
    if len(widths) != 1 or 0 in widths:
        raise GridError(f"{what} rows must all have the same, non-zero length (got lengths {sorted(widths)})")
    if not all(isinstance(v, int) and not isinstance(v, bool) for row in grid for v in row):
        raise GridError(f"{what} must hold integers only")
    return np.array(grid, dtype=np.int64)


def grid_to_tokens(kind: str, grid, metadata: PuzzleDatasetMetadata) -> np.ndarray:
    """Display grid -> model input tokens [L] (int32), validating shape and values for the task."""
    arr = _as_int_grid(grid, "grid")
    side = grid_side(metadata)
    if kind == "sudoku":
        if arr.shape != (9, 9):
            raise GridError(f"a Sudoku grid must be 9x9, got {arr.shape[0]}x{arr.shape[1]}")
        if arr.min() < 0 or arr.max() > 9:
            raise GridError("Sudoku cells must be digits 0..9 (0 = blank)")
        return (arr + SUDOKU_DIGIT_OFFSET).reshape(-1).astype(np.int32)
    if kind == "maze":
        if arr.shape != (side, side):
            raise GridError(f"a maze grid must be {side}x{side}, got {arr.shape[0]}x{arr.shape[1]}")
        if not np.isin(arr, MAZE_INPUT_TOKENS).all():
            raise GridError("maze cells must be 1 (wall), 2 (open), 3 (start) or 4 (goal)")
        return arr.reshape(-1).astype(np.int32)
    if kind == "arc":
        h, w = arr.shape
        if h > ARC_SIDE or w > ARC_SIDE:
            raise GridError(f"an ARC grid must be at most {ARC_SIDE}x{ARC_SIDE}, got {h}x{w}")
        if arr.min() < 0 or arr.max() > 9:
            raise GridError("ARC cells must be colours 0..9")
        # The builder's canvas: colours at the top left, an EOS rail below and to the right, PAD elsewhere.
        canvas = np.full((ARC_SIDE, ARC_SIDE), ARC_PAD, dtype=np.int32)
        canvas[:h, :w] = arr + ARC_COLOUR_OFFSET
        if h < ARC_SIDE:
            canvas[h, :w] = ARC_EOS
        if w < ARC_SIDE:
            canvas[:h, w] = ARC_EOS
        return canvas.reshape(-1)
    raise GridError(f"unknown task {kind!r}")


@torch.inference_mode()
def trace_act_steps(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Run every ACT step of the evaluation loop on `batch` (fresh carry, halt_max_steps calls, as evaluation does)
    and keep what each step predicted: preds [S, B, L] int64, q_halt [S, B] = sigmoid(q_halt_logits) float32,
    and q_halt_logits [S, B]. The last step's preds are what the evaluation saves."""
    model.eval()
    act = unwrap(model).model
    early_exit, act.eval_early_exit = act.eval_early_exit, False  # every step, whatever the caller set
    try:
        carry = model.initial_carry(batch)
        preds, q_logits = [], []
        while True:
            carry, _loss, _metrics, outputs, all_halted = model(return_keys={"preds", "q_halt_logits"}, carry=carry,
                                                                batch=batch)
            preds.append(outputs["preds"].cpu())
            q_logits.append(outputs["q_halt_logits"].float().cpu())
            if all_halted:
                break
    finally:
        act.eval_early_exit = early_exit
    q = torch.stack(q_logits)
    return {"preds": torch.stack(preds), "q_halt": torch.sigmoid(q), "q_halt_logits": q}


def make_batch(inputs: np.ndarray, labels: Optional[np.ndarray], puzzle_identifiers: np.ndarray,
               metadata: PuzzleDatasetMetadata, device: torch.device) -> Dict[str, torch.Tensor]:
    """A batch as the loader makes it: int32 tokens, the dataset's ignored label value mapped to IGNORE_LABEL_ID
    (no labels: everything ignored)."""
    inputs = torch.as_tensor(np.asarray(inputs, dtype=np.int32))
    if labels is None:
        labels_t = torch.full_like(inputs, IGNORE_LABEL_ID)
    else:
        labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int32))
        if metadata.ignore_label_id is not None:
            labels_t = labels_t.masked_fill(labels_t == metadata.ignore_label_id, IGNORE_LABEL_ID)
    return {"inputs": inputs.to(device), "labels": labels_t.to(device),
            "puzzle_identifiers": torch.as_tensor(np.asarray(puzzle_identifiers, dtype=np.int32)).to(device)}


def describe_steps(kind: str, trace: Dict[str, torch.Tensor], row: int) -> List[Dict]:
    return [{"step": s + 1, "prediction": tokens_to_grid(kind, trace["preds"][s, row].numpy()),
             "q_halt": float(trace["q_halt"][s, row])} for s in range(trace["preds"].shape[0])]


def describe_example(kind: str, trace: Dict[str, torch.Tensor], row: int, input_tokens: np.ndarray,
                     label_tokens: Optional[np.ndarray], puzzle_identifier: int, puzzle_name: Optional[str],
                     index: Optional[int], ignore_label_id: Optional[int] = 0) -> Dict:
    """One puzzle for the pages: input, label, final prediction, per-step predictions with q-halt, and whether the
    prediction is right on every labelled cell."""
    final = trace["preds"][-1, row].numpy()
    example = {"index": index, "puzzle_identifier": int(puzzle_identifier), "puzzle_name": puzzle_name,
               "input": tokens_to_grid(kind, input_tokens), "prediction": tokens_to_grid(kind, final),
               "prediction_tokens": final.astype(int).tolist(), "steps": describe_steps(kind, trace, row),
               "label": None, "correct": None}
    if label_tokens is not None:
        example["label"] = tokens_to_grid(kind, label_tokens)
        labelled = (label_tokens != ignore_label_id) if ignore_label_id is not None else np.ones(label_tokens.shape, bool)
        example["correct"] = bool((final[labelled] == label_tokens[labelled]).all())
    return example


class TestSplit:
    """A dataset's test split read from disk (memory-mapped): rows, their puzzle identifiers and names."""

    def __init__(self, dataset_path: str, metadata: PuzzleDatasetMetadata, set_name: str = "all"):
        split = os.path.join(dataset_path, "test")
        load = lambda field: np.load(os.path.join(split, f"{set_name}__{field}.npy"), mmap_mode="r")  # noqa: E731
        self.inputs, self.labels = load("inputs"), load("labels")
        self.puzzle_identifiers, self.puzzle_indices = load("puzzle_identifiers"), load("puzzle_indices")
        self.metadata = metadata
        names_path = os.path.join(dataset_path, "identifiers.json")
        self.names: List[str] = []
        if os.path.isfile(names_path):
            with open(names_path) as f:
                self.names = json.load(f)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def identifier_of(self, row: int) -> int:
        puzzle = int(np.searchsorted(self.puzzle_indices, row, side="right")) - 1
        return int(self.puzzle_identifiers[puzzle])

    def name_of(self, identifier: int) -> Optional[str]:
        return self.names[identifier] if 0 <= identifier < len(self.names) else None


def record_examples(model: torch.nn.Module, split: TestSplit, rows: Sequence[int], device: torch.device,
                    batch_size: int = 16) -> List[Dict]:
    """Per-step records of test rows `rows` (example indices of the split), in batches of `batch_size`."""
    kind = task_kind(split.metadata)
    for row in rows:
        if not 0 <= row < len(split):
            raise GridError(f"puzzle index {row} is out of range: the test split has {len(split)} examples (0..{len(split) - 1})")
    examples = []
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start:start + batch_size])
        inputs = np.stack([np.asarray(split.inputs[r]) for r in chunk])
        labels = np.stack([np.asarray(split.labels[r]) for r in chunk])
        ids = np.array([split.identifier_of(r) for r in chunk])
        trace = trace_act_steps(model, make_batch(inputs, labels, ids, split.metadata, device))
        for b, r in enumerate(chunk):
            examples.append(describe_example(kind, trace, b, inputs[b], labels[b], ids[b], split.name_of(int(ids[b])), r,
                                             split.metadata.ignore_label_id))
    return examples


def visualizer_document(metadata: PuzzleDatasetMetadata, examples: List[Dict], **info) -> Dict:
    """The JSON the pages load: task kind, grid size, and the recorded examples."""
    side = grid_side(metadata)
    return {"format": JSON_FORMAT, "version": 1, "task": task_kind(metadata), "grid_size": [side, side],
            "vocab_size": metadata.vocab_size, "seq_len": metadata.seq_len, **info, "examples": examples}


def write_visualizer_json(path: str, document: Dict) -> None:
    atomic_write_text(path, json.dumps(document, separators=(",", ":")))


def parse_rows(spec: str) -> List[int]:
    """'0,3,5-7' -> [0, 3, 5, 6, 7]; '' or 'none' -> []."""
    spec = spec.strip()
    if spec.lower() in ("", "none"):
        return []
    rows: List[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                rows.extend(range(lo, hi + 1))
            else:
                rows.append(int(part))
        except ValueError:
            raise GridError(f"puzzle list {spec!r} is not like '0,3,5-7' (test example indices)") from None
    return rows
