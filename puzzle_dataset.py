"""The data loader (docs/compatibility.md section 3): padded, rank-sliced batches of puzzle examples from
builder-written dataset folders; train batches depend only on the seed and the pass number, so a run can resume
mid-pass."""

import functools
import json
import os
import signal
import threading
import time
import warnings
import weakref
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pydantic
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataset.common import IGNORE_LABEL_ID, PuzzleDatasetMetadata
from utils.errors import ConfigError, DataError, MissingInputError

# inputs/labels can be gigabytes (ARC train: 3.3 GB each), so they stay on disk; the index arrays are small.
_MMAP_MODES = {"inputs": "r", "labels": "r", "puzzle_identifiers": None, "puzzle_indices": None, "group_indices": None}

# Metadata fields that must agree across dataset_paths.
_SHARED_FIELDS = ("seq_len", "vocab_size", "pad_id", "ignore_label_id", "blank_identifier_id", "sets",
                  "num_puzzle_identifiers")

_BUILD_HINT = ("build it first with a builder, e.g. `python dataset/build_sudoku_dataset.py --output-dir {path}` "
               "(or dataset/build_maze_dataset.py, python -m dataset.build_arc_dataset)")

Batch = Dict[str, torch.Tensor]


class PuzzleDatasetConfig(pydantic.BaseModel):
    """The reference's loader config, field for field."""

    model_config = pydantic.ConfigDict(extra="forbid")

    seed: int
    dataset_paths: List[str]
    global_batch_size: int
    test_set_mode: bool
    epochs_per_iter: int  # epochs in one train pass (the trainer's eval interval)
    rank: int
    num_replicas: int


def load_metadata(dataset_path: str, split: str) -> PuzzleDatasetMetadata:
    """Read `<dataset_path>/<split>/dataset.json`, checking that the folder and the files it names exist."""
    if not os.path.isdir(dataset_path):
        raise MissingInputError(f"dataset path {dataset_path} does not exist; " + _BUILD_HINT.format(path=dataset_path))
    split_dir = os.path.join(dataset_path, split)
    if not os.path.isdir(split_dir):
        raise MissingInputError(f"dataset {dataset_path} has no {split}/ split folder ({split_dir}); "
                                + _BUILD_HINT.format(path=dataset_path))
    json_path = os.path.join(split_dir, "dataset.json")
    if not os.path.isfile(json_path):
        raise MissingInputError(f"{json_path} is missing; " + _BUILD_HINT.format(path=dataset_path))
    with open(json_path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{json_path} is not valid JSON ({e}); rebuild the dataset with its builder") from None
    if not isinstance(raw, dict):
        raise DataError(f"{json_path} is not a valid dataset.json (a JSON object is expected, got "
                         f"{type(raw).__name__}); rebuild the dataset with its builder")
    # Builders of other forks add keys of their own; like the reference, read the known ones and ignore the rest.
    unknown = sorted(set(raw) - set(PuzzleDatasetMetadata.model_fields))
    if unknown:
        warnings.warn(f"{json_path}: ignoring unknown key(s) {', '.join(unknown)}", stacklevel=2)
        raw = {k: v for k, v in raw.items() if k not in unknown}
    try:
        metadata = PuzzleDatasetMetadata(**raw)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        raise DataError(f"{json_path} is not a valid dataset.json ({'.'.join(map(str, err['loc']))}: {err['msg']}); "
                         "rebuild the dataset with its builder") from None
    for set_name in metadata.sets:
        for field in _MMAP_MODES:
            path = os.path.join(split_dir, f"{set_name}__{field}.npy")
            if not os.path.isfile(path):
                raise MissingInputError(f"{path} is missing (set {set_name!r} of {json_path}); "
                                        + _BUILD_HINT.format(path=dataset_path))
    return metadata


def merge_metadata(dataset_paths: List[str], metadatas: List[PuzzleDatasetMetadata]) -> PuzzleDatasetMetadata:
    """One metadata for several dataset folders: shared fields must match, counts are summed.

    Path i > 0 contributes its sets under the names `<set><i>` (`all1`, `all2`, ...), listed in `sets` in the order
    the loader iterates them (each set, then its copies from later paths), so evaluation can index them (the
    reference left them out: docs/compatibility.md section 12, item 11). As in the reference,
    `num_puzzle_identifiers` is the sum while the identifiers themselves are not offset: every path must use the
    same identifier numbering (checked: equal `num_puzzle_identifiers`), and the embedding rows past the first
    path's count stay unused."""
    first = metadatas[0]
    for path, metadata in zip(dataset_paths[1:], metadatas[1:]):
        for field in _SHARED_FIELDS:
            if getattr(metadata, field) != getattr(first, field):
                raise DataError(
                    f"dataset {path} has {field}={getattr(metadata, field)!r} but {dataset_paths[0]} has "
                    f"{getattr(first, field)!r}; datasets loaded together must agree on {', '.join(_SHARED_FIELDS)}"
                )
    total_puzzles = sum(m.total_puzzles for m in metadatas)
    return PuzzleDatasetMetadata(
        pad_id=first.pad_id,
        ignore_label_id=first.ignore_label_id,
        blank_identifier_id=first.blank_identifier_id,
        vocab_size=first.vocab_size,
        seq_len=first.seq_len,
        num_puzzle_identifiers=sum(m.num_puzzle_identifiers for m in metadatas),
        total_groups=sum(m.total_groups for m in metadatas),
        mean_puzzle_examples=sum(m.mean_puzzle_examples * m.total_puzzles for m in metadatas) / total_puzzles,
        total_puzzles=total_puzzles,
        sets=[set_name for set_name, _, _ in _merged_sets(first.sets, len(dataset_paths))],
    )


def _merged_sets(sets: List[str], num_paths: int) -> List[Tuple[str, int, str]]:
    """(merged set name, dataset path index, set name in that path's files), in iteration order."""
    return [(set_name + (str(i) if i else ""), i, set_name) for set_name in sets for i in range(num_paths)]


def _group_order(rng: np.random.Generator, num_groups: int, epochs: int) -> np.ndarray:
    """Groups in the order one pass visits them: `epochs` independent permutations, concatenated."""
    return np.concatenate([rng.permutation(num_groups) for _ in range(epochs)])


def _sample_pass(data: Dict[str, np.ndarray], group_order: np.ndarray, global_batch_size: int,
                 puzzle_rng: np.random.Generator, example_rng: np.random.Generator,
                 ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yield (example rows [G], puzzle index per row [G]) for every full global batch of one train pass.

    Each visited group contributes one puzzle drawn uniformly (`puzzle_rng`, the reference's Philox draws), whose
    examples enter in random order without replacement (`example_rng`) until the batch is full; the rows that do
    not fit are discarded, and the final batch short of G ends the pass."""
    puzzle_indices, group_indices = data["puzzle_indices"], data["group_indices"]
    position = 0
    while position < group_order.size:
        rows, puzzles, filled = [], [], 0
        while position < group_order.size and filled < global_batch_size:
            group = group_order[position]
            position += 1
            puzzle = puzzle_rng.integers(group_indices[group], group_indices[group + 1])
            first_row = puzzle_indices[puzzle]
            size = int(puzzle_indices[puzzle + 1] - first_row)
            take = min(size, global_batch_size - filled)
            rows.append(first_row + example_rng.permutation(size)[:take])
            puzzles.append(np.full(take, puzzle))
            filled += take
        if filled < global_batch_size:
            return
        yield np.concatenate(rows), np.concatenate(puzzles)


def _count_batches(group_sizes: np.ndarray, global_batch_size: int) -> int:
    """Full batches that `_sample_pass` packs from groups of these example counts, visited in this order."""
    ends = np.cumsum(group_sizes)  # rows used once each group is in (before the truncation of an overflow)
    batches, used = 0, 0
    while True:
        # The batch starting after `used` rows is completed by the first group whose end reaches used + G; that
        # group's surplus rows are dropped, so the next batch starts at its end.
        last = np.searchsorted(ends, used + global_batch_size, side="left")
        if last == ends.size:
            return batches
        batches, used = batches + 1, ends[last]


class PuzzleDataset(IterableDataset):
    """Iterable over `(set_name, batch, effective_global_batch)`.

    batch = {inputs int32 [B, L], labels int32 [B, L] (ignored labels -100), puzzle_identifiers int32 [B]}, with
    B = G / W rows for this rank, padded (inputs pad_id, labels -100, identifiers blank_identifier_id).

    Train mode: one iteration runs one pass per set (each pass `epochs_per_iter` epochs over the groups). Passes
    are numbered 1, 2, ... across iterations (the reference's `iters`); pass p covers set `sets[(p - 1) % S]` and
    draws from generators seeded by (seed, p) alone, so every rank builds the same global batch and the stream
    does not depend on the number of loader workers or on the process. Test mode: every example once, in order.
    """

    def __init__(self, config: PuzzleDatasetConfig, split: str = "train"):
        super().__init__()
        if not config.dataset_paths:
            raise ConfigError("dataset_paths is empty; give at least one dataset folder")
        if config.global_batch_size <= 0 or config.epochs_per_iter <= 0:
            raise ConfigError(f"global_batch_size ({config.global_batch_size}) and epochs_per_iter "
                             f"({config.epochs_per_iter}) must be positive")
        if config.seed < 0:
            raise ConfigError(f"seed must be non-negative (it seeds NumPy's Philox), got {config.seed}")
        if config.num_replicas <= 0 or not 0 <= config.rank < config.num_replicas:
            raise ConfigError(f"rank {config.rank} is not in 0..num_replicas-1 (num_replicas {config.num_replicas})")
        if config.global_batch_size % config.num_replicas:
            raise ConfigError(f"global_batch_size {config.global_batch_size} is not divisible by the number of "
                             f"processes {config.num_replicas}; choose a multiple of {config.num_replicas}")
        self.config = config
        self.split = split
        self.local_batch_size = config.global_batch_size // config.num_replicas
        metadatas = [load_metadata(path, split) for path in config.dataset_paths]
        self.metadata = merge_metadata(config.dataset_paths, metadatas)
        self._file_sets = metadatas[0].sets  # set names as written in each path's files

        self._data: Dict[str, Dict[str, np.ndarray]] = {}  # set name -> field -> array; loaded on first use
        self._passes_done = 0  # train passes completed (the reference's `iters` counter before a pass starts)
        self._batches_done = 0  # batches of the next pass already consumed by the run being resumed

    def __getstate__(self):
        # A DataLoader worker receives a pickled copy; pickling a memmap would copy the whole array into the pickle.
        state = self.__dict__.copy()
        state["_data"] = {}
        return state

    def set_resume_position(self, passes_done: int, batches_done: int) -> None:
        """Make the next iteration continue a run that consumed `passes_done` full train passes and then
        `batches_done` batches of pass `passes_done + 1`: it skips those batches (sampling indices only, reading no
        data) and, like an uninterrupted iteration, ends after the pass of the last set.

        `PuzzleDataLoader` keeps that position as it hands out batches (`state_dict`) and sets it here
        (`load_state_dict`). With loader workers (persistent, as `create_dataloader` makes them) the dataset is
        copied into the worker when the DataLoader's first iterator is created, so call this before that."""
        if self.config.test_set_mode:
            raise ValueError("set_resume_position applies to train mode; test mode always covers every example once")
        if passes_done < 0 or batches_done < 0:
            raise ValueError(f"resume position must be non-negative, got passes_done={passes_done}, "
                             f"batches_done={batches_done}")
        self._passes_done, self._batches_done = passes_done, batches_done

    def batches_in_pass(self, pass_number: int) -> int:
        """Number of batches train pass `pass_number` (1-based) yields (the trainer's progress bar counts the steps
        a run takes with it); it varies from pass to pass when puzzles hold several examples, because of the rows
        dropped at batch boundaries. Fast when all puzzles of a group have the same number of examples (every
        builder's output); otherwise it replays the pass's sampling."""
        if self.config.test_set_mode:
            raise ValueError("batches_in_pass applies to train mode")
        if pass_number < 1:
            raise ValueError(f"pass numbers start at 1, got {pass_number}")
        set_name = self.metadata.sets[(pass_number - 1) % len(self.metadata.sets)]
        data = self._load()[set_name]
        puzzle_rng, example_rng = self._pass_generators(pass_number)
        group_order = _group_order(puzzle_rng, data["group_indices"].size - 1, self.config.epochs_per_iter)

        puzzle_sizes = np.diff(data["puzzle_indices"])
        group_starts = data["group_indices"][:-1]
        if np.array_equal(puzzle_sizes, np.repeat(puzzle_sizes[group_starts], np.diff(data["group_indices"]))):
            # Which puzzle a group contributes does not change its example count: the group order decides.
            return _count_batches(puzzle_sizes[group_starts][group_order], self.config.global_batch_size)
        return sum(1 for _ in _sample_pass(data, group_order, self.config.global_batch_size, puzzle_rng, example_rng))

    def __iter__(self) -> Iterator[Tuple[str, Batch, int]]:
        worker = get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise ValueError(f"PuzzleDataset supports at most one loader worker, got {worker.num_workers} "
                             "(each would yield the same batches); use num_workers=1")
        self._load()
        return self._iter_test() if self.config.test_set_mode else self._iter_train()

    def _load(self) -> Dict[str, Dict[str, np.ndarray]]:
        if not self._data:
            for set_name, path_index, file_set_name in _merged_sets(self._file_sets, len(self.config.dataset_paths)):
                split_dir = os.path.join(self.config.dataset_paths[path_index], self.split)
                arrays = {
                    field: np.load(os.path.join(split_dir, f"{file_set_name}__{field}.npy"), mmap_mode=mode)
                    for field, mode in _MMAP_MODES.items()
                }
                empty = np.flatnonzero(np.diff(arrays["group_indices"]) <= 0)
                if empty.size:
                    # The reference fails here with numpy's "low >= high" when such a group is drawn.
                    raise DataError(f"group {empty[0]} of set {file_set_name!r} in {split_dir} has no puzzles; "
                                     "rebuild the dataset with its builder")
                self._data[set_name] = arrays
        return self._data

    def _pass_generators(self, pass_number: int) -> Tuple[np.random.Generator, np.random.Generator]:
        # Puzzle stream: the reference's Philox(seed + iters). Example stream: the same Philox jumped 2^128 draws
        # ahead, so the two never overlap (the reference drew examples from the unseeded global RNG).
        bit_generator = np.random.Philox(seed=self.config.seed + pass_number)
        return np.random.Generator(bit_generator), np.random.Generator(bit_generator.jumped())

    def _iter_train(self) -> Iterator[Tuple[str, Batch, int]]:
        G, B, rank = self.config.global_batch_size, self.local_batch_size, self.config.rank
        sets = self.metadata.sets
        # A resumed run first finishes the iteration it was in: from the set of its unfinished pass to the last.
        for set_name in sets[self._passes_done % len(sets):]:
            self._passes_done += 1
            skip, self._batches_done = self._batches_done, 0
            data = self._data[set_name]
            puzzle_rng, example_rng = self._pass_generators(self._passes_done)
            group_order = _group_order(puzzle_rng, data["group_indices"].size - 1, self.config.epochs_per_iter)
            for batch_number, (rows, puzzles) in enumerate(_sample_pass(data, group_order, G, puzzle_rng, example_rng)):
                if batch_number < skip:
                    continue
                rows, puzzles = rows[rank * B: (rank + 1) * B], puzzles[rank * B: (rank + 1) * B]
                yield set_name, self._collate(data["inputs"][rows], data["labels"][rows],
                                              data["puzzle_identifiers"][puzzles]), G

    def _iter_test(self) -> Iterator[Tuple[str, Batch, int]]:
        # Each yield's third item is the window's real rows across all ranks; `local_real_rows` turns it into
        # this rank's leading real rows (the rest are padding).
        G, B, rank = self.config.global_batch_size, self.local_batch_size, self.config.rank
        for set_name in self.metadata.sets:
            data = self._data[set_name]
            num_examples = len(data["inputs"])
            for start in range(0, num_examples, G):
                end = min(num_examples, start + G)
                # This rank's share of the window [start, end); empty (all padding) past the end.
                lo, hi = start + rank * B, min(start + (rank + 1) * B, end)
                puzzles = np.searchsorted(data["puzzle_indices"], np.arange(lo, hi), side="right") - 1
                yield set_name, self._collate(data["inputs"][lo:hi], data["labels"][lo:hi],
                                              data["puzzle_identifiers"][puzzles]), end - start

    def _collate(self, inputs: np.ndarray, labels: np.ndarray, puzzle_identifiers: np.ndarray) -> Batch:
        """Cast to int32, map ignored labels to -100, pad to B rows: inputs [B, L], labels [B, L], ids [B]."""
        inputs, labels = inputs.astype(np.int32), labels.astype(np.int32)
        puzzle_identifiers = puzzle_identifiers.astype(np.int32)
        if self.metadata.ignore_label_id is not None:
            labels[labels == self.metadata.ignore_label_id] = IGNORE_LABEL_ID
        pad = self.local_batch_size - len(puzzle_identifiers)
        if pad:
            inputs = np.pad(inputs, ((0, pad), (0, 0)), constant_values=self.metadata.pad_id)
            labels = np.pad(labels, ((0, pad), (0, 0)), constant_values=IGNORE_LABEL_ID)
            puzzle_identifiers = np.pad(puzzle_identifiers, (0, pad), constant_values=self.metadata.blank_identifier_id)
        return {"inputs": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                "puzzle_identifiers": torch.from_numpy(puzzle_identifiers)}


def local_real_rows(global_rows: int, rank: int, local_batch_size: int) -> int:
    """How many leading rows of a rank's batch hold puzzles, given the batch's global count of real rows (the
    loader's third item): ranks take consecutive slices of the global batch and only its tail is padding."""
    return max(0, min(local_batch_size, global_rows - rank * local_batch_size))


def _init_worker(parent_pid: int, _worker_id: int) -> None:
    # SIGTERM/SIGINT sent to the whole process group (Ctrl-C, torchrun, schedulers) are for the trainer, which
    # finishes its step and saves; a worker killed by them would abort the trainer first. So the worker cannot
    # be stopped by them, and must instead end by itself when the trainer is gone (SIGKILLed, OOM-killed):
    # torch's own check waits on queues that a dead trainer may have left full.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True, name="orphan-check").start()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:  # an orphan is re-parented (to init or a subreaper)
        time.sleep(0.5)
    os._exit(1)  # no clean-up: the queues' feeder threads could block forever on a pipe nobody reads


class PuzzleDataLoader(DataLoader):
    """A DataLoader over a PuzzleDataset that knows where a train run is in the data: after the batches it has
    handed out, `state_dict()` gives {"passes_done": train passes completed, "batches_done": batches of the next
    pass handed out}; `load_state_dict` of such a position, before the first iteration, makes the loader continue
    there (the dataset skips those batches). Iteration r over the loader (0-based, from the start of the run) is
    passes r * S + 1 ... (r + 1) * S, one per set (S sets); a loader at `passes_done` P is in iteration
    `P // S` (`next_iteration`), which a resumed run finishes first."""

    def __init__(self, dataset: PuzzleDataset, **kwargs):
        super().__init__(dataset, **kwargs)
        self._passes_done = 0
        self._batches_done = 0

    @property
    def next_iteration(self) -> int:
        """The iteration (0-based, from the start of the run) that the next `for ... in loader` runs or finishes."""
        return self._passes_done // len(self.dataset.metadata.sets)

    def state_dict(self) -> Dict[str, int]:
        return {"passes_done": self._passes_done, "batches_done": self._batches_done}

    def load_state_dict(self, position: Dict[str, int]) -> None:
        if getattr(self, "_iterator", None) is not None:
            raise ValueError("load_state_dict must come before the loader's first iteration (its worker holds a "
                             "copy of the dataset from then on)")
        self.dataset.set_resume_position(position["passes_done"], position["batches_done"])
        self._passes_done, self._batches_done = position["passes_done"], position["batches_done"]

    def __iter__(self):
        batches = super().__iter__()
        return batches if self.dataset.config.test_set_mode else self._counted(batches)

    def _counted(self, batches) -> Iterator[Tuple[str, Batch, int]]:
        sets = self.dataset.metadata.sets
        first_pass = self.next_iteration * len(sets)  # passes completed before this iteration's first set
        for set_name, batch, global_batch_size in batches:
            passes_done = first_pass + sets.index(set_name)
            if passes_done != self._passes_done:  # the batch opens a new pass
                self._passes_done, self._batches_done = passes_done, 0
            self._batches_done += 1
            yield set_name, batch, global_batch_size
        self._passes_done, self._batches_done = first_pass + len(sets), 0


# Every loader made here, so that a failing run can end their workers (stop_all_workers) wherever it fails.
_LOADERS: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()


def stop_workers(loader: DataLoader, timeout: float = 5.0) -> None:
    """End `loader`'s worker processes now: asked to stop (they finish within a moment), then killed, since
    they ignore SIGTERM. Call before leaving the process on an error: the interpreter's exit would otherwise
    wait forever for them."""
    iterator = getattr(loader, "_iterator", None)  # the persistent workers' iterator, once iteration started
    workers = list(getattr(iterator, "_workers", None) or [])
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()  # also unregisters them, so their death below raises nothing here
    for worker in workers:
        worker.join(timeout)
        if worker.is_alive():
            worker.kill()
            worker.join(timeout)


def stop_all_workers() -> None:
    for loader in list(_LOADERS):
        stop_workers(loader)


def create_dataloader(config: PuzzleDatasetConfig, split: str, num_workers: int = 1,
                      ) -> Tuple[PuzzleDataLoader, PuzzleDatasetMetadata]:
    """A PuzzleDataLoader over `PuzzleDataset(config, split)` (batches are already formed) and the merged metadata.

    One worker reads ahead up to 8 batches and persists across iterations, keeping the pass counter;
    num_workers=0 reads in the calling process (same batches). Creating an iterator draws its worker seed from
    the loader's own generator, not from the global torch RNG (whose stream, e.g. ACT exploration, then does not
    depend on when loaders start; the batches do not use that seed)."""
    if num_workers not in (0, 1):
        raise ValueError(f"num_workers must be 0 or 1, got {num_workers}: more workers would each yield the same batches")
    dataset = PuzzleDataset(config, split=split)
    worker_options = dict(prefetch_factor=8, persistent_workers=True,
                          worker_init_fn=functools.partial(_init_worker, os.getpid())) if num_workers else {}
    loader = PuzzleDataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                              generator=torch.Generator().manual_seed(config.seed), **worker_options)
    _LOADERS.add(loader)
    return loader, dataset.metadata
