"""A failing run ends: an exception in the trainer (single process, or one rank under torchrun) exits non-zero with
no process of the run left, a SIGKILLed trainer leaves no loader worker behind, and a closed stdout pipe ends the
run instead of hanging it.

The exception is provoked the way a user met it: `<checkpoint_path>/train_state` is a file, so the first step
checkpoint (checkpoint_every_steps=2, while the loader worker is running) raises."""

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import ENV, REPO, launch

GONE_WITHIN = 30  # seconds: the acceptance limit for "ended, and nothing left"

TINY = ["evaluators=[]", "global_batch_size=8", "epochs=20", "eval_interval=20", "arch.hidden_size=16",
        "arch.num_heads=2", "arch.L_layers=1", "arch.H_cycles=1", "arch.L_cycles=1", "arch.halt_max_steps=2",
        "arch.puzzle_emb_ndim=0", "arch.puzzle_emb_len=0",
        "++device=cpu", "++metrics_jsonl=true"]


@pytest.fixture(scope="module")
def data_dir(make_sudoku_dataset):
    return make_sudoku_dataset(64, 16, 30)


def command(data_dir, checkpoint_path, *extra, nproc=1):
    return launch("pretrain.py", nproc) + [f"data_paths=[{data_dir}]", *TINY, f"++checkpoint_path={checkpoint_path}", *extra]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_group_gone(pgid: int) -> bool:
    deadline = time.monotonic() + GONE_WITHIN
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def start(cmd, env=ENV, **kwargs):
    """`cmd` in its own session (its loader workers and torchrun's ranks share its process group)."""
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, text=True, **kwargs)


def finish(proc):
    """(returncode, stdout, stderr), killing the group if it has not ended by itself (the failure mode)."""
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the run hung after its error:\n{(err or '')[-3000:]}")
    return proc.returncode, out, err


def broken_checkpoint_folder(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / "train_state").write_text("not a folder")  # the first step checkpoint raises
    return str(path)


@pytest.mark.parametrize("nproc", [1, 2])
def test_exception_in_trainer_ends_the_run(data_dir, tmp_path, nproc):
    path = broken_checkpoint_folder(tmp_path)
    proc = start(command(data_dir, path, "checkpoint_every_steps=2", nproc=nproc),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rc, _out, err = finish(proc)
    try:
        assert rc != 0, err[-3000:]
        assert "train_state" in err  # the error that ended it is shown
        assert wait_group_gone(proc.pid), "a process of the run (loader worker or rank) was left running"
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigkilled_trainer_leaves_no_worker(data_dir, tmp_path):
    path = str(tmp_path / "run")
    proc = start(command(data_dir, path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(path, "metrics.jsonl")
    try:
        deadline = time.monotonic() + 120
        while not (os.path.isfile(metrics) and '"train/' in open(metrics).read()):  # training (so loading) started
            assert proc.poll() is None, "run ended before the kill"
            assert time.monotonic() < deadline, "run made no progress"
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        assert wait_group_gone(proc.pid), "the loader worker outlived its SIGKILLed trainer"
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_closed_stdout_pipe_ends_the_run(data_dir, tmp_path):
    """`python pretrain.py ... | head -1`: once the reader is gone, the run stops instead of hanging."""
    path = str(tmp_path / "run")
    # Unbuffered, so the first evaluation line reaches the pipe at once; every epoch prints one.
    proc = start(command(data_dir, path, "epochs=200", "eval_interval=1"), env={**ENV, "PYTHONUNBUFFERED": "1"},
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdout.readline()  # like `head -1`: read one line, then close the pipe
        proc.stdout.close()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the run kept going (or hung) after its stdout reader went away")
        assert proc.returncode != 0
        assert wait_group_gone(proc.pid), "a loader worker was left running"
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
