"""Shared pieces of the dataset builders, the loader and the evaluators: the on-disk metadata model, the eight
dihedral transforms with their inverses, and atomic writing of a dataset folder."""

import argparse
import contextlib
import csv
import json
import multiprocessing
import os
import sys
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pydantic
from tqdm import tqdm

from utils.atomic import atomic_path


IGNORE_LABEL_ID = -100  # label value the loss skips: the loader maps `ignore_label_id` to it


class PuzzleDatasetMetadata(pydantic.BaseModel):
    """`<split>/dataset.json`. Field order is the file's key order (docs/compatibility.md section 1.2)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    pad_id: int
    ignore_label_id: Optional[int]
    blank_identifier_id: int
    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int
    total_groups: int
    mean_puzzle_examples: float
    total_puzzles: int
    sets: List[str]


# Dihedral group of the square: id -> transform. Inverse of id t is DIHEDRAL_INVERSE[t].
DIHEDRAL_INVERSE = [0, 3, 2, 1, 4, 5, 6, 7]


def dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    """Apply dihedral transform `tid` (0..7) to a 2-D grid (h, w)."""
    if tid == 0:
        return arr  # identity
    if tid == 1:
        return np.rot90(arr, k=1)  # 90 degrees counter-clockwise
    if tid == 2:
        return np.rot90(arr, k=2)
    if tid == 3:
        return np.rot90(arr, k=3)
    if tid == 4:
        return np.fliplr(arr)  # left-right mirror
    if tid == 5:
        return np.flipud(arr)  # up-down mirror
    if tid == 6:
        return arr.T  # transpose
    if tid == 7:
        return np.fliplr(np.rot90(arr, k=1))  # anti-transpose
    raise ValueError(f"dihedral transform id must be in 0..7, got {tid}")


def inverse_dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    return dihedral_transform(arr, DIHEDRAL_INVERSE[tid])


class DatasetBuildError(Exception):
    """A problem with a builder's input or output; reported as one line by `run_cli`."""


def run_cli(main, *args, **kwargs):
    """Run a builder's main; a DatasetBuildError becomes one line on stderr and exit code 1."""
    try:
        return main(*args, **kwargs)
    except DatasetBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


@contextlib.contextmanager
def atomic_output_dir(output_dir: str) -> Iterator[str]:
    """Yield a temporary folder beside `output_dir`; rename it to `output_dir` only if the body succeeds.

    Refuses an `output_dir` that exists and is not empty, so a build never mixes with other data and a failed
    build leaves nothing half-written behind."""
    output_dir = os.path.normpath(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise DatasetBuildError(
            f"output directory {output_dir} already exists and is not empty; remove it or choose another --output-dir"
        )
    with atomic_path(output_dir) as tmp:  # the rename replaces an empty output_dir
        os.makedirs(tmp)
        yield tmp


def write_json(path: str, obj) -> None:
    # Python's json.dump defaults (no indent, ', ' / ': ' separators, ASCII-escaped), as the reference writes.
    # json.dumps gives the same text through the C encoder, many times faster for the large ARC files.
    with open(path, "w") as f:
        f.write(json.dumps(obj))


def save_split(root: str, split: str, metadata: PuzzleDatasetMetadata, arrays: Dict[str, Dict[str, np.ndarray]]) -> None:
    """Write `<root>/<split>/dataset.json` and `<set>__<field>.npy` for every set in `arrays`."""
    split_dir = os.path.join(root, split)
    os.makedirs(split_dir, exist_ok=True)
    write_json(os.path.join(split_dir, "dataset.json"), metadata.model_dump())
    for set_name, fields in arrays.items():
        for field, arr in fields.items():
            np.save(os.path.join(split_dir, f"{set_name}__{field}.npy"), arr)


def inverse_aug(name: str) -> Tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """Split an augmented ARC puzzle name `<base>|||t<k>|||<m(0)..m(9)>` into its base name and the function that
    maps an augmented grid (colours 0..9) back to the original: inverse dihedral first, then inverse colours.
    A name without `|||` is an original puzzle: identity."""
    if "|||" not in name:
        return name, lambda grid: grid
    fields = name.split("|||")
    trans_id = int(fields[-2][1:])  # "t<k>"
    inverse_colors = np.argsort(np.array([int(d) for d in fields[-1]], dtype=np.uint8)).astype(np.uint8)

    def invert(grid: np.ndarray) -> np.ndarray:
        return inverse_colors[inverse_dihedral_transform(grid, trans_id)]

    return fields[0], invert


def source_csv_path(source_repo: str, source_dir: Optional[str], filename: str, offline_hint: str) -> str:
    """Local path of `filename` of a hub dataset: `<source_dir>/<filename>` when `source_dir` is given, else the
    file that huggingface_hub downloads from (or finds cached for) the dataset repo `source_repo`."""
    if source_dir is not None:
        path = os.path.join(source_dir, filename)
        if not os.path.isfile(path):
            raise DatasetBuildError(f"{path} not found (--source-dir must hold train.csv and test.csv)")
        return path
    # Imported here so that the loader and evaluators, which also use this module, do not pay for it.
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return huggingface_hub.hf_hub_download(source_repo, filename, repo_type="dataset")
    except LocalEntryNotFoundError:
        raise DatasetBuildError(
            f"cannot reach the Hugging Face hub for {source_repo}/{filename} and it is not cached; {offline_hint}"
        ) from None
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetBuildError(f"cannot download {filename} of hub dataset {source_repo}: {first_line}") from None


def add_source_arguments(parser: argparse.ArgumentParser, source_repo: str, output_dir: str, rows: str) -> None:
    """The Sudoku and Maze builders' input and output flags; `rows` names what --subsample-size counts."""
    parser.add_argument("--source-repo", default=source_repo, help="hub dataset repo")
    parser.add_argument("--source-dir", default=None, help="read train.csv and test.csv here instead of the hub")
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument("--subsample-size", type=int, default=None, help=f"train {rows} to keep (random subset)")


def read_source_splits(args: argparse.Namespace, read_split: Callable[[str], tuple], offline_hint: str) -> dict:
    """{"train": read_split(train.csv), "test": read_split(test.csv)} from --source-dir or the hub's --source-repo."""
    return {split: read_split(source_csv_path(args.source_repo, args.source_dir, f"{split}.csv", offline_hint))
            for split in ("train", "test")}


def subsample(questions: np.ndarray, answers: np.ndarray, size: Optional[int],
              rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """`size` random rows of both (all rows when size is None or not smaller), drawn from the builder's generator."""
    if size is not None and size < len(questions):
        keep = rng.choice(len(questions), size=size, replace=False)
        questions, answers = questions[keep], answers[keep]
    return questions, answers


def read_source_csv(path: str) -> Iterator[Tuple[int, str, str, str]]:
    """Rows of a CSV in the hub's Sudoku/Maze layout (header `source,question,answer,rating`, skipped) as
    (line number, question, answer, rating)."""
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            if next(reader, None) is None:
                raise DatasetBuildError(f"{path} is empty (expected the header source,question,answer,rating)")
            for row in reader:
                if len(row) != 4:
                    raise DatasetBuildError(
                        f"{path} line {reader.line_num}: expected 4 columns (source,question,answer,rating), "
                        f"got {len(row)}"
                    )
                yield reader.line_num, row[1], row[2], row[3]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetBuildError(f"{path}: not a readable CSV file ({e})") from None


def write_source_csv(path: str, rows: List[Tuple[str, str, int]]) -> None:
    """(question, answer, rating) rows as a CSV in the hub's layout, which read_source_csv (--source-dir) reads."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["source", "question", "answer", "rating"])
        writer.writerows(("generated", q, a, r) for q, a, r in rows)


def parse_generator_args(doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                         argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The offline generators' command line: --output-dir, --num-train, --num-test, the generator's own flags
    (`add_arguments`), --seed, --workers."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="new folder for train.csv and test.csv")
    parser.add_argument("--num-train", type=int, required=True)
    parser.add_argument("--num-test", type=int, required=True)
    add_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="processes (default: all cores); does not change the output")
    return parser.parse_args(argv)


def write_generated_csvs(args: argparse.Namespace, generate: Callable[[int], List[Tuple[str, str, int]]]) -> None:
    """<output_dir>/train.csv and test.csv from generate(num_train + num_test) distinct rows: the first num_train
    are the train split, so the splits share no row."""
    if args.num_train < 0 or args.num_test < 0 or args.workers < 1:
        raise DatasetBuildError("--num-train and --num-test must be >= 0 and --workers >= 1")
    with atomic_output_dir(args.output_dir) as tmp:
        rows = generate(args.num_train + args.num_test)
        write_source_csv(os.path.join(tmp, "train.csv"), rows[: args.num_train])
        write_source_csv(os.path.join(tmp, "test.csv"), rows[args.num_train :])


def _run_chunk(job):
    make_chunk, seed, index, count = job
    return make_chunk(np.random.default_rng([seed, index]), count)  # own stream per chunk: scheduling-independent


def generate_in_chunks(make_chunk: Callable[[np.random.Generator, int], list], count: int, seed: int, workers: int,
                       key: Callable = lambda item: item, desc: str = "generating", chunk_size: int = 20,
                       progress: bool = True) -> list:
    """`count` items with pairwise distinct `key(item)`, made by `make_chunk(rng, n)` (n items; picklable, e.g. a
    module-level function or a functools.partial of one) in `workers` processes, with a progress bar on stderr.

    Chunk i always gets n = min(chunk_size, what is missing) and a generator seeded with [seed, i], so the result
    depends on the seed but not on `workers`. Duplicates are dropped and replaced from further chunks."""
    items, seen = [], set()
    next_chunk = 0
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        with tqdm(total=count, desc=desc, file=sys.stderr, disable=not progress) as bar:
            while len(items) < count:
                missing = count - len(items)
                jobs = [(make_chunk, seed, next_chunk + i, min(chunk_size, missing - k))
                        for i, k in enumerate(range(0, missing, chunk_size))]
                next_chunk += len(jobs)
                for chunk in pool.imap(_run_chunk, jobs) if pool else map(_run_chunk, jobs):
                    for item in chunk:
                        if key(item) not in seen and len(items) < count:
                            seen.add(key(item))
                            items.append(item)
                    bar.update(len(chunk))
    finally:
        if pool:
            pool.terminate()
    return items


def save_single_example_split(root: str, split: str, inputs: np.ndarray, labels: np.ndarray, vocab_size: int,
                              group_size: int) -> None:
    """Sudoku/Maze layout: one example per puzzle, groups of `group_size` consecutive puzzles, all identifiers 0
    (`identifiers.json` is `["<blank>"]`). `inputs`/`labels` are token arrays [N, seq_len]."""
    num_puzzles, seq_len = inputs.shape
    num_groups = num_puzzles // group_size
    metadata = PuzzleDatasetMetadata(
        pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=vocab_size, seq_len=seq_len,
        num_puzzle_identifiers=1, total_groups=num_groups, mean_puzzle_examples=1,
        total_puzzles=num_groups,  # the reference's value (groups, not puzzles): docs/compatibility.md section 11
        sets=["all"])
    save_split(root, split, metadata, {"all": {
        "inputs": inputs,
        "labels": labels,
        "puzzle_identifiers": np.zeros(num_puzzles, dtype=np.int32),
        "puzzle_indices": np.arange(num_puzzles + 1, dtype=np.int32),
        "group_indices": np.arange(0, num_puzzles + 1, group_size, dtype=np.int32),
    }})
