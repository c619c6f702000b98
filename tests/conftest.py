"""Shared pytest set-up: one thread per process (the CI machine has 2 cores; oversubscribed threads make the tests
many times slower), W&B off, and small datasets built once per session by the project's own builders."""

import importlib.util
import json
import os
import subprocess
import sys

# Before torch is imported anywhere: subprocesses inherit these too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The environment of every subprocess the tests start: one thread, W&B off, the repository importable, and none of
# torchrun's variables (a single-process run must not think it runs under torchrun; torchrun sets its own).
TORCHRUN_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {**{k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES},
       "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": REPO}


def launch(script: str, nproc: int = 1) -> list:
    """The command line that runs `script` (a path or `-m module`) in `nproc` CPU processes: python itself for one,
    torchrun (one node, a free rendezvous port) for more."""
    args = script.split(" ")
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
            "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", *args]


def assert_refused(rc: int, stderr: str, *fragments: str) -> str:
    """A command that failed (non-zero exit) with one `error: ...` line holding every one of `fragments`."""
    assert rc != 0, stderr
    return one_error_line(stderr, *fragments)


def one_error_line(stderr: str, *fragments: str) -> str:
    """The run's only line on stderr, which must be an `error: ...` line (the project's one-line refusals) holding
    every one of `fragments`."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def load_split(dataset_dir, split):
    """(dataset.json as a dict, {field: array} of set `all`) of one split of a dataset folder."""
    import numpy as np

    folder = os.path.join(dataset_dir, split)
    arrays = {f: np.load(os.path.join(folder, f"all__{f}.npy"))
              for f in ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")}
    with open(os.path.join(folder, "dataset.json")) as f:
        return json.load(f), arrays


def run_pretrain_in_process(argv, capsys):
    """pretrain.py's command line in this process, for runs that stop at start (config, data or checkpoint
    errors): the same checks, then the same run(). Returns (exit code, stdout, stderr)."""
    import pretrain
    from omegaconf import OmegaConf
    from training.config import check_command_line, compose_raw

    config_file = os.path.join(REPO, "config", "cfg_pretrain.yaml")
    capsys.readouterr()
    rc = 0
    with torch.random.fork_rng(devices=[]):  # run() seeds the global RNG; other tests keep theirs
        try:
            check_command_line(config_file, argv)
            pretrain.run(OmegaConf.create(compose_raw(config_file, argv)))
        except SystemExit as e:
            rc = e.code
        finally:
            pretrain.stop_all_workers()
    out = capsys.readouterr()
    return rc, out.out, out.err


RUNNER = os.path.join(REPO, "scripts", "run_eval_only.py")
_runner_module = None


def run_eval_only_in_process(args, capsys):
    """main() of scripts/run_eval_only.py in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    global _runner_module
    if _runner_module is None:
        spec = importlib.util.spec_from_file_location("run_eval_only", RUNNER)
        _runner_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_runner_module)
    capsys.readouterr()
    rc = _runner_module.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def read_eval_report(outdir) -> dict:
    with open(os.path.join(outdir, "eval_report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def make_sudoku_dataset(tmp_path_factory):
    """Factory: `make_sudoku_dataset(num_train, num_test, min_blanks, max_blanks=None)` -> path of a Sudoku dataset
    folder (train/ and test/) written by dataset.generate_sudoku + dataset/build_sudoku_dataset.py (seed 0).
    Each distinct recipe is built once per session."""
    built = {}

    def make(num_train: int, num_test: int, min_blanks: int, max_blanks: int = None) -> str:
        key = (num_train, num_test, min_blanks, max_blanks if max_blanks is not None else min_blanks)
        if key not in built:
            root = tmp_path_factory.mktemp("sudoku_{}_{}_{}_{}".format(*key))
            src, out = root / "src", root / "data"
            for cmd in (
                [sys.executable, "-m", "dataset.generate_sudoku", "--output-dir", str(src), "--num-train", str(key[0]),
                 "--num-test", str(key[1]), "--min-blanks", str(key[2]), "--max-blanks", str(key[3]), "--seed", "0"],
                [sys.executable, "dataset/build_sudoku_dataset.py", "--source-dir", str(src), "--output-dir", str(out),
                 "--seed", "0"],
            ):
                result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
                assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}"
            built[key] = str(out)
        return built[key]

    return make


@pytest.fixture(scope="session")
def sudoku_dataset(make_sudoku_dataset):
    """A small Sudoku dataset: 128 train and 32 test puzzles with 0-2 blanks each (not augmented)."""
    return make_sudoku_dataset(128, 32, 0, 2)


# A tiny TRM, trained for a few steps by pretrain.py, evaluated by scripts/run_eval_only.py: the checkpoints that
# the visualizer, server and page tests run on.
TINY_TRAINED_ARCH = ["arch.hidden_size=32", "arch.num_heads=2", "arch.expansion=2", "arch.H_cycles=2",
                     "arch.L_cycles=2", "arch.halt_max_steps=3", "arch.halt_exploration_prob=0",
                     "arch.puzzle_emb_ndim=0", "arch.puzzle_emb_len=0"]


def _train_and_evaluate(root, data, batch: int, epochs: int) -> dict:
    ckpt, outdir = root / "ckpt", root / "eval"
    steps = []
    for cmd in (
        [sys.executable, "pretrain.py", f"data_paths=[{data}]", "evaluators=[]", f"+checkpoint_path={ckpt}",
         f"global_batch_size={batch}", f"epochs={epochs}", f"eval_interval={epochs}", "lr=3e-3", "lr_warmup_steps=2",
         "metrics_jsonl=True", *TINY_TRAINED_ARCH],
        None,
    ):
        if cmd is None:
            steps = sorted((n for n in os.listdir(ckpt) if n.startswith("step_") and n[5:].isdigit()),
                           key=lambda n: int(n[5:]))
            cmd = [sys.executable, "scripts/run_eval_only.py", "--checkpoint", str(ckpt / steps[-1]), "--dataset", data,
                   "--outdir", str(outdir), "--device", "cpu", "--global-batch-size", str(batch),
                   "--record-puzzles", "0-3", *TINY_TRAINED_ARCH]
        result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}"
    return {"checkpoint": str(ckpt / steps[-1]), "checkpoint_dir": str(ckpt), "dataset": data, "outdir": str(outdir),
            "overrides": list(TINY_TRAINED_ARCH)}


@pytest.fixture(scope="session")
def trained_sudoku(sudoku_dataset, tmp_path_factory):
    """{checkpoint, checkpoint_dir, dataset, outdir (the runner's outputs), overrides} of a tiny Sudoku TRM."""
    return _train_and_evaluate(tmp_path_factory.mktemp("trained_sudoku"), sudoku_dataset, batch=32, epochs=2)


@pytest.fixture(scope="session")
def maze_dataset(tmp_path_factory):
    """20 + 20 real 30x30 mazes (tests/fixtures/maze_small) through dataset/build_maze_dataset.py."""
    out = tmp_path_factory.mktemp("maze_dataset") / "data"
    cmd = [sys.executable, "dataset/build_maze_dataset.py", "--source-dir", "tests/fixtures/maze_small",
           "--output-dir", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return str(out)


@pytest.fixture(scope="session")
def trained_maze(maze_dataset, tmp_path_factory):
    return _train_and_evaluate(tmp_path_factory.mktemp("trained_maze"), maze_dataset, batch=4, epochs=2)
