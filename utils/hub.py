"""Resolve a `--checkpoint` spec to a local file: a local file as given, a local folder's newest `step_<N>` file
(a training run's checkpoint folder), or `hf://owner/repo[/path/in/repo]` downloaded through huggingface_hub into
the usual Hugging Face cache (HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE).

Published checkpoints: hf://alphaXiv/trm-model-maze, hf://alphaXiv/trm-model-sudoku, hf://alphaXiv/trm-model-arc-agi-1.
Without a file name the repo's checkpoint is the file named `step_*` (the highest step if there are several).
"""

import importlib
import os
import re
from typing import Dict, Iterable, Optional, Tuple

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from utils.errors import ConfigError, InputError, MissingInputError

HF_PREFIX = "hf://"
STEP_FILE = re.compile(r"step_(\d+)?")  # `step_32550`, `step_259320_arc_ag1_attn_type_h3l4`, ...


class HubUnreachableError(InputError, ConnectionError):
    """The Hugging Face Hub could not be reached (no connection, or offline mode) and the file is not cached."""


def _connection_errors() -> Tuple[type, ...]:
    """Connection failures that `HfApi.list_repo_files` lets through unwrapped: those of the HTTP client of the
    installed huggingface_hub (httpx2 from 2.0, httpx in 1.x, requests before)."""
    errors = [OfflineModeIsEnabled]
    for module_name, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        errors.extend(getattr(module, name) for name in names)
    return tuple(errors)


# LocalEntryNotFoundError: what hf_hub_download / snapshot_download raise when the hub is unreachable (or offline
# mode is on) and the cache cannot serve the request.
UNREACHABLE_ERRORS = (LocalEntryNotFoundError, *_connection_errors())


def resolve_checkpoint(spec: str, verbose: bool = True) -> str:
    """Local file path for a checkpoint spec: a local file (returned unchanged), a local folder (its `step_*` file
    with the highest step; `verbose`: printed), `hf://owner/repo` (the repo's `step_*` file) or
    `hf://owner/repo/path/in/repo`. Hub files land in, and are served from, the HF cache."""
    if not spec.startswith(HF_PREFIX):
        if os.path.isdir(spec):
            return _newest_in_folder(spec, verbose)
        if not os.path.exists(spec):
            raise MissingInputError(f"checkpoint {spec} does not exist (hub checkpoints are given as hf://owner/repo)")
        return spec

    repo_id, filename = _parse_hf_spec(spec)
    try:
        if filename is None:
            filename = _pick_step_file(spec, _list_repo_files(repo_id))
        return hf_hub_download(repo_id, filename)
    except UNREACHABLE_ERRORS as e:
        raise HubUnreachableError(
            f"could not reach the Hugging Face Hub for {spec} ({_reason(e)}); "
            f"download the checkpoint elsewhere and pass its local path to --checkpoint"
        ) from e
    except RepositoryNotFoundError:
        raise MissingInputError(
            f"{spec}: no repository {repo_id} on the Hugging Face Hub (or it is private or gated: log in first)"
        ) from None
    except EntryNotFoundError:  # after LocalEntryNotFoundError, its subclass: here the file is missing remotely
        raise MissingInputError(f"{spec}: no file {filename} in repository {repo_id}") from None


def _parse_hf_spec(spec: str) -> Tuple[str, Optional[str]]:
    """`hf://owner/repo[/path/in/repo]` -> (`owner/repo`, `path/in/repo` or None)."""
    parts = spec[len(HF_PREFIX) :].split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"checkpoint spec {spec!r} must look like hf://owner/repo or hf://owner/repo/path/in/repo")
    filename = parts[2] if len(parts) == 3 and parts[2] else None
    return f"{parts[0]}/{parts[1]}", filename


def _list_repo_files(repo_id: str) -> Iterable[str]:
    """Files of the repo's main revision: asked of the hub, or read from the cached snapshot in offline mode."""
    if constants.HF_HUB_OFFLINE:
        snapshot = snapshot_download(repo_id, local_files_only=True)
        return [
            os.path.relpath(os.path.join(folder, name), snapshot)
            for folder, _, names in os.walk(snapshot)
            for name in names
        ]
    return HfApi().list_repo_files(repo_id)


def _step_files(paths: Iterable[str]) -> Dict[str, int]:
    """The weights files among `paths` (named `step_*`), with their step (-1 for a name without a number)."""
    candidates = {}
    for path in paths:
        name = os.path.basename(path)
        match = STEP_FILE.match(name)
        # Not a checkpoint's description (.config.yaml) or the predictions saved at its evaluation (_all_preds).
        if match and not name.endswith(".config.yaml") and "_all_preds" not in name:
            candidates[path] = int(match.group(1)) if match.group(1) else -1
    return candidates


def _newest_in_folder(folder: str, verbose: bool) -> str:
    """The folder's `step_*` weights file with the highest step (a run folder's latest checkpoint)."""
    names = sorted(os.listdir(folder))
    candidates = _step_files(n for n in names if os.path.isfile(os.path.join(folder, n)))
    if not candidates:
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise MissingInputError(f"checkpoint folder {folder} holds no step_<N> weights file "
                                f"({'it holds: ' + shown if names else 'it is empty'}); pass a step_<N> file, or the "
                                f"folder a training run wrote them to (checkpoints/<project>/<run>)")
    path = os.path.join(folder, _newest(folder, candidates))
    if verbose:
        among = f"the highest step of {len(candidates)}" if len(candidates) > 1 else "the only one"
        print(f"Checkpoint: {path} ({among} in {folder})")
    return path


def _pick_step_file(spec: str, files: Iterable[str]) -> str:
    """The file named `step_*`; with several, the highest step (a name without a step number ranks lowest)."""
    candidates = _step_files(files)
    if not candidates:
        raise MissingInputError(
            f"{spec}: no checkpoint file named step_* in the repository; name the file: {spec.rstrip('/')}/<file>"
        )
    return _newest(spec, candidates)


def _newest(spec: str, candidates: Dict[str, int]) -> str:
    """The candidate with the highest step; refused when several share it."""
    best_step = max(candidates.values())
    best = sorted(path for path, step in candidates.items() if step == best_step)
    if len(best) > 1:
        raise MissingInputError(f"{spec}: several checkpoints with the same step ({', '.join(best)}); name one of them")
    return best[0]


def _reason(error: BaseException) -> str:
    """Why the hub could not be reached, in one line: offline mode, or the underlying connection error."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and the file is not in the local cache"
    while error.__cause__ is not None:
        error = error.__cause__
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
