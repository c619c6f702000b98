"""Model weights on disk, in the reference's format: one `torch.save` of the loss head's state dict, keys
`[_orig_mod.]model.inner.<name>` (docs/compatibility.md sections 5-6). One loader serves training, evaluation and tests:
it reads with `weights_only=True` (a downloaded checkpoint must not run code), strips wrapper prefixes in
exactly one place, resizes or refuses a puzzle table of another size, and names any other mismatch."""

import hashlib
import os
import pickle
from typing import Dict

import torch

from models.common import strip_wrapper_prefixes
from utils.atomic import atomic_path
from utils.errors import CheckpointError, MissingInputError

PUZZLE_TABLE_KEY = "model.inner.puzzle_emb.weights"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile / DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def strip_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {strip_wrapper_prefixes(k): v for k, v in state_dict.items()}


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Load a raw state dict onto the CPU, refusing anything that is not plain tensors."""
    if not os.path.isfile(path):
        raise MissingInputError(f"checkpoint {path} does not exist; pass the path of a step_<N> file or hf://owner/repo")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is not a plain state dict of tensors and was refused ({first_line})") from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); is the file complete?") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} is not a state dict (a dict of name -> tensor); got a {type(obj).__name__}")
    for key, value in obj.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            raise CheckpointError(f"checkpoint {path} is not a state dict (a dict of name -> tensor): entry {key!r} "
                                  f"is of type {type(value).__name__}; pass a weights file (step_<N>)")
    return obj


def _mismatch_hint(key: str) -> str:
    if "lm_head" in key or "embed_tokens" in key:
        return "the vocabulary differs: the checkpoint was trained on another task"
    if "mlp_t" in key or "embed_pos" in key:
        return "the sequence length differs: the checkpoint was trained on another task or puzzle_emb_len"
    if "puzzle_emb" in key:
        return "the number of puzzle identifiers differs: rebuild the dataset with the recipe (subsets, --num-aug, --seed) the checkpoint was trained on"
    return "the architecture differs: set arch.hidden_size / expansion / L_layers / mlp_t / pos_encodings to the checkpoint's"


def load_model_state(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], *, resize_puzzle_table: bool,
                     source: str = "checkpoint") -> None:
    """Copy `state_dict` into `model` (the loss head; wrappers are looked through).

    resize_puzzle_table: True applies the reference's training rule (a table of another size is replaced by its
    row-mean, broadcast to this model's size: fine-tuning on a new dataset); False refuses it (evaluation: the
    ids of this dataset would index rows the checkpoint never trained)."""
    model = unwrap(model)
    state_dict = strip_prefixes(state_dict)
    expected = model.state_dict()

    table = state_dict.get(PUZZLE_TABLE_KEY)
    if table is not None and PUZZLE_TABLE_KEY in expected and table.shape != expected[PUZZLE_TABLE_KEY].shape:
        want = expected[PUZZLE_TABLE_KEY].shape
        if not resize_puzzle_table or table.shape[1:] != want[1:]:
            hint = (_mismatch_hint(PUZZLE_TABLE_KEY) if table.shape[1:] == want[1:] else
                    "the embedding width differs: set arch.hidden_size / puzzle_emb_ndim to the checkpoint's")
            raise CheckpointError(
                f"{source} has a puzzle-embedding table of shape {list(table.shape)} but this model needs {list(want)}: "
                f"{hint}")
        print(f"Resizing puzzle embedding table from {list(table.shape)} to {list(want)} (row mean)")
        state_dict[PUZZLE_TABLE_KEY] = table.mean(dim=0, keepdim=True).expand(want).contiguous()

    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        what = "lacks" if missing else "has an unexpected"
        raise CheckpointError(
            f"{source} {what} key {key} ({len(missing)} missing, {len(unexpected)} unexpected): {_mismatch_hint(key)}")
    for key, value in expected.items():
        if state_dict[key].shape != value.shape:
            raise CheckpointError(
                f"{source} has {key} of shape {list(state_dict[key].shape)} but this model expects {list(value.shape)}: "
                f"{_mismatch_hint(key)}")
    model.load_state_dict(state_dict, strict=True)  # copies into the model's tensors (its device and dtypes)


def atomic_torch_save(obj, path: str) -> None:
    """torch.save under a temporary name, fsynced, then renamed: a crash never leaves a truncated file at `path`."""
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def save_model_state(model: torch.nn.Module, path: str, compiled: bool) -> None:
    """The reference's weights file: the loss head's state dict on the CPU, keys prefixed `_orig_mod.` when the
    training model is compiled (as official checkpoints are)."""
    prefix = "_orig_mod." if compiled else ""
    atomic_torch_save({prefix + k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, path)
