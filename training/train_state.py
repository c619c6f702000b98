"""Full training-state checkpoints for exact resume, beside the reference-format weights files: everything a run
needs to continue bit for bit (weights, optimizer moments, EMA shadow, step, data position, ACT exploration
generator, ACT carries).

On disk, one folder per checkpoint, `<checkpoint_path>/train_state/step_<N>/`:
    shared.pt      rank 0: step, data position (the train loader's passes_done and batches_done), model state
                   dict (incl. the puzzle table and H_init/L_init buffers), optimizer state dicts (AdamATan2
                   moments; sign-SGD is stateless), EMA shadow
    rank_<r>.pt    every rank: its ACT exploration generator's state and its ACT carries
    manifest.json  written last by rank 0: {"format", "step", "code_version", "config_hash", "config",
                   "files": {name: {"bytes", "sha256"}}}; a folder without it is incomplete
Every file is written under a temporary name, fsynced and renamed. Resume picks the newest folder whose files
match the manifest (a truncated or corrupt one is skipped with a warning) and refuses one whose `config` (the
fields in COMPATIBILITY_FIELDS) differs from the current run's. The LR schedule is a pure function of the step, and
the loader's batches depend only on (seed, pass), so the step and (passes done, batches done) fix both; the only
other random draws of a train step are ACT exploration's, from the generator saved per rank.
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch

from models.ema import EMAHelper
from puzzle_dataset import PuzzleDataLoader
from training.checkpoint import CheckpointError, atomic_torch_save, load_model_state, sha256_file, unwrap
from utils import distributed
from utils.atomic import atomic_write_text
from utils.errors import ConfigError

FORMAT = 1
STATE_DIR = "train_state"
MANIFEST = "manifest.json"
SHARED_FILE = "shared.pt"
METRICS_FILE = "metrics.jsonl"  # written by training/wandb_logging.py when metrics_jsonl=True

# Config fields that fix the shapes of the saved state, the data order or the step count. A resumed run must
# match them (plus the world size and the step count derived from the data); anything else (lr, weight decay,
# warm-up, ema_rate, evaluation and checkpoint settings, names) may change between the two runs.
COMPATIBILITY_FIELDS = ("arch", "data_paths", "global_batch_size", "micro_batch_size", "epochs", "eval_interval",
                        "seed", "ema", "freeze_weights")
# Arch switches that change how a step runs, not what it computes: a run may resume with them toggled (e.g. turn
# recompute on after running out of memory).
EXECUTION_ONLY_ARCH_KEYS = ("recompute", "fused_kernels")


@dataclasses.dataclass
class TrainState:
    """What a train step changes: `save` writes it and `restore` reads it back, with the train loader's position
    (which the loader keeps itself); the evaluation copies and the bar's row count are not saved."""
    model: torch.nn.Module  # loss head around the ACT model, compiled on CUDA
    optimizers: List[torch.optim.Optimizer]
    base_lrs: List[float]
    carries: List[Any]  # one ACT carry per micro-batch slot (None until the first step)
    act_generator: torch.Generator  # ACT exploration draws (on the training device)
    step: int
    total_steps: int
    micro_batch_size: int
    compiled: bool = False
    ema: Optional[EMAHelper] = None
    ema_model: Optional[torch.nn.Module] = None  # evaluation copy holding the EMA weights (made once)
    eval_compiled: Optional[torch.nn.Module] = None  # compiled wrapper of an eager evaluation model (made once)
    halted_rows: int = 0  # rows (all ranks) whose puzzle halted in the last step, known on rank 0: the bar's weights


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def state_root(checkpoint_path: str) -> str:
    return os.path.join(checkpoint_path, STATE_DIR)


# ----------------------------------------------------------------------------------------------------------------
# What must match between the saving and the resuming run

def compatibility_config(config, world_size: int, total_steps: int) -> dict:
    values = config.model_dump(include=set(COMPATIBILITY_FIELDS))
    values["arch"] = {k: v for k, v in values["arch"].items() if k not in EXECUTION_ONLY_ARCH_KEYS}
    values["data_paths"] = [os.path.normpath(p) for p in values["data_paths"]]
    values.update(world_size=world_size, total_steps=total_steps)
    return values


def config_hash(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_compatible(manifest: dict, current: dict, source: str) -> None:
    """Raise CheckpointError (one line naming the differing keys) unless the state was saved by a run with the
    same compatibility config."""
    if manifest.get("config_hash") == config_hash(current):
        return
    saved, now = _flatten(manifest.get("config", {})), _flatten(current)
    for key in EXECUTION_ONLY_ARCH_KEYS:  # states saved before these keys were left out of the hash
        saved.pop(f"arch.{key}", None)
    diffs = [f"{k} (checkpoint {saved.get(k, '<unset>')!r}, now {now.get(k, '<unset>')!r})"
             for k in sorted(saved.keys() | now.keys()) if saved.get(k, "<unset>") != now.get(k, "<unset>")]
    if saved and not diffs:
        return
    raise CheckpointError(
        f"training state {source} was written by an incompatible config: {'; '.join(diffs) or 'config hash differs'}; "
        "resume with the same values, or start a new run (another +run_name or checkpoint_path)")


@functools.lru_cache(maxsize=None)
def code_version() -> Optional[str]:
    """`git rev-parse HEAD` of the repository holding this file (when first asked), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the state

def act_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of ACT exploration's draws on `device`, seeded by (seed, rank): ranks explore independently,
    and the stream is apart from the global one that pretrain.py seeds with seed + rank for the initial weights."""
    derived = np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(derived))


def map_carry(fn: Callable[[torch.Tensor], torch.Tensor], carry: Any, as_dicts: bool = False) -> Any:
    """`fn` applied to every tensor of an ACT carry (dataclasses, dicts, tensors; None stays None), keeping its
    classes, or as nested dicts with `as_dicts`."""
    if carry is None:
        return None
    if dataclasses.is_dataclass(carry):
        fields = {f.name: map_carry(fn, getattr(carry, f.name), as_dicts) for f in dataclasses.fields(carry)}
        return fields if as_dicts else type(carry)(**fields)
    if isinstance(carry, dict):
        return {k: map_carry(fn, v, as_dicts) for k, v in carry.items()}
    if isinstance(carry, torch.Tensor):
        return fn(carry)
    raise TypeError(f"cannot map a carry holding {type(carry).__name__}")


def carry_to_plain(carry: Any) -> Any:
    """An ACT carry as nested dicts of CPU tensors, loadable with weights_only."""
    return map_carry(lambda t: t.detach().cpu(), carry, as_dicts=True)


def carry_from_plain(plain: Any, model: torch.nn.Module, device: torch.device) -> Any:
    """Inverse of carry_to_plain: the model's own carry classes, filled with the saved tensors on `device`."""
    if plain is None:
        return None
    template = unwrap(model).initial_carry({k: v.to(device) for k, v in plain["current_data"].items()})

    def fill(template, plain):
        if dataclasses.is_dataclass(template):
            return type(template)(**{f.name: fill(getattr(template, f.name), plain[f.name])
                                     for f in dataclasses.fields(template)})
        if isinstance(template, dict):
            if template.keys() != plain.keys():
                raise CheckpointError(f"saved ACT carry has keys {sorted(plain)}, the model's has {sorted(template)}")
            return {k: fill(template[k], plain[k]) for k in template}
        return plain.to(device)

    return fill(template, plain)


# ----------------------------------------------------------------------------------------------------------------
# Save

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1), fsync=True)


def _save_file(obj: Any, path: str) -> Tuple[str, dict]:
    atomic_torch_save(obj, path)
    return os.path.basename(path), {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def save(config, dist_info: distributed.DistInfo, state: TrainState, train_loader: PuzzleDataLoader) -> str:
    """Write this step's training state and the train loader's position (every rank takes part), then keep only
    the newest `keep_last_checkpoints`. Returns the checkpoint folder."""
    folder = os.path.join(state_root(config.checkpoint_path), f"step_{state.step}")
    manifest_path = os.path.join(folder, MANIFEST)
    if dist_info.is_main:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(manifest_path):  # rewriting this step: incomplete until the new manifest lands
            os.remove(manifest_path)
    distributed.barrier()

    files = []
    if dist_info.is_main:
        files.append(_save_file({
            "step": state.step,
            **train_loader.state_dict(),  # passes_done, batches_done
            "model": unwrap(state.model).state_dict(),
            "optimizers": [opt.state_dict() for opt in state.optimizers],
            "ema": state.ema.state_dict() if state.ema is not None else None,
        }, os.path.join(folder, SHARED_FILE)))
    files.append(_save_file({
        "act_generator": state.act_generator.get_state(),
        "carries": [carry_to_plain(carry) for carry in state.carries],
    }, os.path.join(folder, rank_file(dist_info.rank))))

    all_files = [f for rank_files in distributed.all_gather_objects(files) for f in rank_files]
    if dist_info.is_main:
        current = compatibility_config(config, dist_info.world_size, state.total_steps)
        _write_json(manifest_path, {
            "format": FORMAT, "step": state.step, "code_version": code_version(),
            "config_hash": config_hash(current), "config": current, "files": dict(all_files)})
        _fsync_dir(folder)
        prune(state_root(config.checkpoint_path), config.keep_last_checkpoints, state.step)
    return folder


def _step_folders(root: str) -> List[Tuple[int, str]]:
    """(step, folder) of every step_<N> folder under `root`, newest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name))
             for name in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", name))]
    return sorted(found, reverse=True)


def prune(root: str, keep: int, current_step: int) -> None:
    """Keep the `keep` newest complete checkpoints up to `current_step`; delete the rest, including incomplete
    folders and any folder past `current_step` (left by a run that this one resumed before)."""
    kept = 0
    for step, folder in _step_folders(root):
        if step <= current_step and kept < keep and os.path.isfile(os.path.join(folder, MANIFEST)):
            kept += 1
        else:
            shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Find, verify, load

def verify(folder: str) -> dict:
    """The folder's manifest, after checking every file it lists against its size and sha256."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError("it has no manifest.json (the write did not finish)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"its manifest.json is unreadable ({type(e).__name__})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"its format {manifest.get('format')!r} is not {FORMAT}")
    for name, expected in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{name} is missing")
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            raise CheckpointError(f"{name} has {size} bytes, the manifest says {expected['bytes']} (truncated?)")
        if sha256_file(path) != expected["sha256"]:
            raise CheckpointError(f"{name} does not match the sha256 in the manifest (corrupt)")
    return manifest


def find_latest(checkpoint_path: str, warn: Callable[[str], None]) -> Optional[Tuple[str, dict]]:
    """(folder, manifest) of the newest complete, intact training state of the run, or None."""
    for _step, folder in _step_folders(state_root(checkpoint_path)):
        try:
            return folder, verify(folder)
        except CheckpointError as e:
            warn(f"warning: skipping training state {folder}: {e}; trying the previous one")
    return None


def _read(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load(folder: str, dist_info: distributed.DistInfo, state: TrainState, train_loader: PuzzleDataLoader) -> None:
    """Restore `state` (model, optimizers, EMA, step, carries, this rank's ACT generator) and put the train loader
    at the saved position (before its first iteration)."""
    shared = _read(os.path.join(folder, SHARED_FILE))
    mine = _read(os.path.join(folder, rank_file(dist_info.rank)))
    load_model_state(state.model, shared["model"], resize_puzzle_table=False, source=folder)
    if len(shared["optimizers"]) != len(state.optimizers):
        raise CheckpointError(f"training state {folder} holds {len(shared['optimizers'])} optimizers, this run has "
                              f"{len(state.optimizers)}")
    for opt, opt_state in zip(state.optimizers, shared["optimizers"]):
        opt.load_state_dict(opt_state)
    if state.ema is not None:
        state.ema.load_state_dict(shared["ema"])
    state.step = shared["step"]
    train_loader.load_state_dict({"passes_done": shared["passes_done"], "batches_done": shared["batches_done"]})
    if len(mine["carries"]) != len(state.carries):
        raise CheckpointError(f"training state {folder} holds {len(mine['carries'])} ACT carries per rank, this run "
                              f"has {len(state.carries)} micro-batch slots")
    state.carries = [carry_from_plain(c, state.model, dist_info.device) for c in mine["carries"]]
    if "act_generator" in mine:
        state.act_generator.set_state(mine["act_generator"])
    elif dist_info.is_main:  # written before exploration had its own generator (it drew from the global RNG)
        print(f"note: training state {folder} holds no ACT generator state; exploration continues from a fresh "
              "seeded stream, so this resume is not bit for bit", file=sys.stderr, flush=True)


def find_resumable(config, dist_info: distributed.DistInfo) -> Optional[Tuple[str, dict]]:
    """(folder, manifest) of the newest intact training state of config.checkpoint_path (rank 0 looks, every rank
    gets the answer), or None: the run then starts from scratch."""
    found = None
    if dist_info.is_main:
        found = find_latest(config.checkpoint_path, warn=lambda msg: print(msg, file=sys.stderr, flush=True))
        if found is None:
            print(f"resume: no complete training state in {state_root(config.checkpoint_path)}; starting from scratch")
    return distributed.broadcast_object(found)


def restore(found: Tuple[str, dict], config, dist_info: distributed.DistInfo, state: TrainState,
            train_loader: PuzzleDataLoader) -> None:
    """Continue from `found` (find_resumable): refuse an incompatible config (CheckpointError), restore `state`
    and the train loader's position (call before the loader's first iteration) and drop the metrics logged past
    the saved step."""
    folder, manifest = found
    check_compatible(manifest, compatibility_config(config, dist_info.world_size, state.total_steps), folder)
    load(folder, dist_info, state, train_loader)
    if dist_info.is_main:
        rewind_metrics_file(config.checkpoint_path, state.step)
        print(f"Resumed from {folder} (step {state.step})")


def rewind_metrics_file(checkpoint_path: str, step: int) -> None:
    """Drop the lines past `step` from the run's metrics.jsonl (training/wandb_logging.py's file sink): the
    resumed run logs those steps again."""
    path = os.path.join(checkpoint_path, METRICS_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    atomic_write_text(path, "".join(kept))


def refuse_existing_run(config, dist_info: distributed.DistInfo) -> None:
    """A run without +resume=true must start in a folder no other run has written to: mixing two runs'
    checkpoints in one folder would make `step_*` and resume pick up the wrong run's files. Rank 0 looks, every
    rank raises the same ConfigError."""
    problem = None
    if dist_info.is_main and not config.resume and os.path.isdir(config.checkpoint_path):
        entries = os.listdir(config.checkpoint_path)
        if (_step_folders(state_root(config.checkpoint_path)) or "all_config.yaml" in entries
                or any(re.fullmatch(r"step_\d+", name) for name in entries)):
            problem = (f"{config.checkpoint_path} already holds a run's checkpoints; continue that run with "
                       f"+resume=true, or start over: delete the folder (rm -r {shlex.quote(config.checkpoint_path)}) "
                       "or choose another +run_name (or checkpoint_path)")
    problem = distributed.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)


# ----------------------------------------------------------------------------------------------------------------
# Failures: end the process, with its loader workers

EXIT_GRACE_S = 10.0  # after an error, the most the normal teardown (atexit hooks, W&B, process group) may take


@contextlib.contextmanager
def end_run_on_error(stop_workers: Callable[[], None]):
    """Around a whole run: any exception (or exit) stops the loader workers (`stop_workers`), which otherwise keep
    the interpreter's exit waiting forever; then the exception goes on (printed by Hydra, exit code 1). Under
    torchrun the other ranks then fail in their next collective (gloo: at once) or are stopped by torchrun. If
    the teardown after an error hangs anyway, the process exits with code 1 after EXIT_GRACE_S seconds. A
    closed stdout (`pretrain.py ... | head -3`) ends the run with one line instead of a traceback."""
    try:
        yield
    except BaseException as e:
        if not (isinstance(e, SystemExit) and not e.code):
            timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(1,))
            timer.daemon = True
            timer.start()
        if isinstance(e, BrokenPipeError):
            # Later writes and the interpreter's final flush of stdout would raise again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            print("stopping: the output pipe was closed (e.g. by `| head`)", file=sys.stderr, flush=True)
            stop_workers()
            raise SystemExit(1) from None
        raise
    finally:
        stop_workers()


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: stop at the next step boundary, after saving

class StopRequest:
    """Catches SIGTERM and SIGINT; the trainer asks `agreed()` at every step boundary and, when it returns a
    signal number, saves the training state and exits with 128 + that number (the shell's code for death by
    that signal, so schedulers and `&&` chains see an unfinished run). A second signal acts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, _frame):
        # No printing here: the handler may interrupt a write to the same stream.
        self.signum = self.signum or signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second signal: the usual effect

    def agreed(self, dist_info: distributed.DistInfo) -> int:
        """The signal number if any rank caught one (the same answer on every rank: a collective), else 0."""
        signum = distributed.max_over_ranks(self.signum)
        if signum and dist_info.is_main:
            print(f"\n{signal.Signals(signum).name} caught: saving the training state, then stopping "
                  "(continue with +resume=true)", file=sys.stderr, flush=True)
        return signum

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
