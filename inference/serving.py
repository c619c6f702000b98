"""A checkpoint loaded once for interactive use, and the two predictions the pages ask for: a grid run through every
ACT step (POST /predict) and a saved evaluation output read back (GET /predict). scripts/serve.py and
infra/modal_app.py are thin layers over these functions; errors are `RequestError`s carrying an HTTP status."""

import dataclasses
import glob
import json
import os
import re
import threading
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from dataset.common import PuzzleDatasetMetadata
from inference import recording
from inference.model_loader import load_model_from_checkpoint
from puzzle_dataset import load_metadata
from training.config import compose_config
from utils.errors import ConfigError, InputError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "config", "cfg_pretrain.yaml")
# The pages that scripts/serve.py and infra/modal_app.py serve.
PAGES_DIR = os.path.join(REPO_ROOT, "visualizers")
SCRIPT = "trm_viz.js"  # shared by the pages
PAGES = ("sudoku_visualizer.html", "maze_visualizer.html", "arc_visualizer.html", "unified_visualizer.html")


class RequestError(InputError):
    """A request that cannot be answered; `status` is the HTTP code (400 bad input, 404 unknown, 422 wrong task)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class ServingModel:
    model: torch.nn.Module
    metadata: PuzzleDatasetMetadata  # of the dataset's test split: vocabulary, length, puzzle table
    task: str
    device: torch.device
    checkpoint: str
    dataset: str
    identifiers: List[str]  # identifier -> puzzle name (identifiers.json); ['<blank>'] for Sudoku and maze
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # one forward at a time


def load_for_inference(checkpoint: str, dataset: str, overrides: Sequence[str] = (), device: Optional[str] = None,
                       config_file: str = DEFAULT_CONFIG) -> ServingModel:
    """The model of `checkpoint` (a step_<N> file or hf://owner/repo[/file]) for `dataset`'s test split, through the
    project's one loader (architecture from the checkpoint's saved description, Hydra `overrides` winning), in
    eval mode on `device` (default: CUDA when available)."""
    config = compose_config(config_file, list(overrides), fixed=dict(data_paths=[dataset], data_paths_test=[]))
    metadata = load_metadata(dataset, "test")
    task = recording.task_kind(metadata)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} asked for, but torch sees no CUDA device; use --device cpu")
    torch.manual_seed(config.seed)
    loaded = load_model_from_checkpoint(checkpoint, dataset_metadata=metadata, overrides=overrides, device=dev,
                                        batch_size=1, config=config, config_file=config_file)
    names_path = os.path.join(dataset, "identifiers.json")
    identifiers = ["<blank>"]
    if os.path.isfile(names_path):
        with open(names_path) as f:
            identifiers = json.load(f)
    return ServingModel(loaded.model, metadata, task, dev, checkpoint, dataset, identifiers)


def _resolve_identifier(loaded: ServingModel, request: Dict) -> int:
    """The puzzle identifier a request names (number or name); ARC needs a trained one, never the blank 0."""
    value = request.get("puzzle_identifier", request.get("puzzle_name"))
    if loaded.task != "arc":
        if value not in (None, 0, "<blank>"):
            raise RequestError(400, f"a {loaded.task} request takes no puzzle identifier (every {loaded.task} "
                                    "puzzle uses the blank identifier 0)")
        return 0
    if value is None:
        raise RequestError(400, "an ARC request needs 'puzzle_identifier' (a number 1..N or a name from the dataset's "
                                "identifiers.json, e.g. '007bbfb7'): the blank identifier 0 was never trained")
    if isinstance(value, str) and not value.isdigit():
        if value not in loaded.identifiers:
            raise RequestError(404, f"unknown puzzle name {value!r}: not in {loaded.dataset}/identifiers.json")
        return loaded.identifiers.index(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RequestError(400, "'puzzle_identifier' must be an integer or a puzzle name")
    number = int(value)
    count = loaded.metadata.num_puzzle_identifiers
    if not 1 <= number < count:
        raise RequestError(404, f"unknown puzzle identifier {number}: this checkpoint knows 1..{count - 1} "
                                "(0 is the untrained blank)")
    return number


def predict_grid(loaded: ServingModel, request: Dict) -> Dict:
    """POST /predict: {"grid": rows, "task": optional, "puzzle_identifier": ARC only} -> every ACT step's prediction
    and sigmoid(q_halt), the final prediction, and the prediction's tokens."""
    if not isinstance(request, dict):
        raise RequestError(400, "the request body must be a JSON object like {\"task\": \"sudoku\", \"grid\": [[...]]}")
    task = request.get("task", loaded.task)
    if task != loaded.task:
        raise RequestError(422, f"this server runs a {loaded.task} checkpoint; got task {task!r}")
    if "grid" not in request:
        raise RequestError(400, "the request has no 'grid' (a list of rows of integers)")
    try:
        tokens = recording.grid_to_tokens(loaded.task, request["grid"], loaded.metadata)
    except recording.GridError as e:
        raise RequestError(400, str(e)) from None
    identifier = _resolve_identifier(loaded, request)
    batch = recording.make_batch(tokens[None], None, np.array([identifier]), loaded.metadata, loaded.device)
    with loaded.lock:
        trace = recording.trace_act_steps(loaded.model, batch)
    example = recording.describe_example(loaded.task, trace, 0, tokens, None, identifier,
                                         loaded.identifiers[identifier] if identifier < len(loaded.identifiers) else None,
                                         None)
    return {"task": loaded.task, "grid_size": [recording.grid_side(loaded.metadata)] * 2, "source": "model", **example}


_STEP_FILE = re.compile(r"step_(\d+)_all_preds\.(\d+)$")


def newest_outputs(run_dir: str) -> str:
    """The highest-step `step_<N>_all_preds.<rank>` of rank 0 in `run_dir`."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "step_*_all_preds.0")):
        match = _STEP_FILE.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        raise RequestError(404, f"no step_<N>_all_preds.0 in {run_dir}: run scripts/run_eval_only.py --outdir {run_dir}")
    return max(found)[1]


class SavedOutputs:
    """Outputs of scripts/run_eval_only.py (a folder), read once: GET /predict answers from them."""

    def __init__(self, run_dir: str, task: str):
        self.run_dir, self.task = run_dir, task
        self.preds_file = newest_outputs(run_dir)
        self.saved = torch.load(self.preds_file, map_location="cpu", weights_only=True)
        if "preds" not in self.saved or "inputs" not in self.saved:
            raise RequestError(404, f"{self.preds_file} has no preds/inputs: evaluate with --eval-save-outputs "
                                    "inputs labels puzzle_identifiers preds")
        self.document = None
        json_path = os.path.join(run_dir, recording.VISUALIZER_JSON)
        if os.path.isfile(json_path):
            with open(json_path) as f:
                self.document = json.load(f)

    def __len__(self) -> int:
        return int(self.saved["preds"].shape[0])

    def example(self, index: int) -> Dict:
        if not 0 <= index < len(self):
            raise RequestError(404, f"index {index} is out of range: {self.preds_file} holds {len(self)} rows (0..{len(self) - 1})")
        recorded = {e["index"]: e for e in (self.document or {}).get("examples", [])}
        if index in recorded:  # recorded by the runner with every ACT step
            return {"task": self.task, "source": "saved", "preds_file": self.preds_file, **recorded[index]}
        preds = self.saved["preds"][index].numpy()
        labels = self.saved.get("labels")
        label, correct = None, None
        if labels is not None:
            row = labels[index].numpy().copy()
            correct = bool(((preds == row) | (row < 0)).all())
            row[row < 0] = 0  # ignored positions (PAD) show as PAD
            label = recording.tokens_to_grid(self.task, row)
        ids = self.saved.get("puzzle_identifiers")
        return {"task": self.task, "source": "saved", "preds_file": self.preds_file, "index": index,
                "puzzle_identifier": int(ids[index]) if ids is not None else None, "puzzle_name": None,
                "input": recording.tokens_to_grid(self.task, self.saved["inputs"][index].numpy()),
                "label": label, "prediction": recording.tokens_to_grid(self.task, preds),
                "prediction_tokens": preds.astype(int).tolist(), "steps": [], "correct": correct}
