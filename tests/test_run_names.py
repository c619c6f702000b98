"""Run names and checkpoint folders: default names are shell-safe (no space), a given name must be, and a run
never writes into a folder holding another run's checkpoints unless told to continue it (+resume=true)."""

import os
import shlex
import subprocess
import sys

import pytest
import torch

import pretrain
from tests.conftest import ENV, REPO, one_error_line, run_pretrain_in_process
from training import train_state
from training.config import SHELL_SAFE, compose_config
from utils.distributed import DistInfo
from utils.errors import ConfigError

CFG = os.path.join(REPO, "config", "cfg_pretrain.yaml")
ONE_PROCESS = DistInfo(0, 1, 0, torch.device("cpu"), None)
TINY = ["evaluators=[]", "global_batch_size=8", "epochs=1", "eval_interval=1", "arch.hidden_size=16",
        "arch.num_heads=2", "arch.L_layers=1", "arch.H_cycles=1", "arch.L_cycles=1", "arch.halt_max_steps=2",
        "++device=cpu"]


def test_default_names_are_shell_safe():
    config = pretrain.fill_run_names(compose_config(CFG, ["data_paths=[data/my sudoku set]"]))
    assert " " not in config.run_name and SHELL_SAFE.fullmatch(config.run_name), config.run_name
    assert config.run_name.startswith("TinyRecursiveReasoningModel_ACTV1-")
    assert SHELL_SAFE.fullmatch(config.project_name), config.project_name
    assert shlex.split(config.checkpoint_path) == [config.checkpoint_path]  # pastes into a shell as one word


@pytest.mark.parametrize("override", ["+run_name=my run", "+run_name='x;y'", "+project_name='x:y*'"])
def test_unsafe_given_name_is_refused(override):
    with pytest.raises(ConfigError, match="is not a usable name"):
        compose_config(CFG, ["data_paths=[x]", override])


@pytest.mark.parametrize("leftover", ["all_config.yaml", "step_8", "train_state/step_8"])
def test_folder_of_another_run_is_refused_without_resume(tmp_path, leftover):
    path = tmp_path / "run"
    (path / leftover).parent.mkdir(parents=True, exist_ok=True)
    if leftover.startswith("train_state"):
        (path / leftover).mkdir()
    else:
        (path / leftover).write_text("")
    config = compose_config(CFG, ["data_paths=[x]", f"++checkpoint_path={path}"])
    with pytest.raises(ConfigError) as info:
        train_state.refuse_existing_run(config, ONE_PROCESS)
    assert "+resume=true" in str(info.value) and "rm -r" in str(info.value) and "+run_name" in str(info.value)
    resumed = config.model_copy(update={"resume": True})
    train_state.refuse_existing_run(resumed, ONE_PROCESS)  # continuing it is what +resume=true is for


def test_empty_or_new_folder_is_accepted(tmp_path):
    for path in (tmp_path, tmp_path / "new"):
        train_state.refuse_existing_run(compose_config(CFG, ["data_paths=[x]", f"++checkpoint_path={path}"]),
                                        ONE_PROCESS)


def test_rerun_with_the_same_name_is_refused_in_one_line(sudoku_dataset, tmp_path, capsys):
    args = [f"data_paths=[{sudoku_dataset}]", *TINY, f"++checkpoint_path={tmp_path / 'run'}"]
    first = subprocess.run([sys.executable, "pretrain.py", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(os.listdir(tmp_path / "run"))
    rc, _, err = run_pretrain_in_process(args, capsys)  # the same command again (in process: it stops at start)
    assert rc == 2
    one_error_line(err, "already holds a run's checkpoints", "+resume=true")
    assert sorted(os.listdir(tmp_path / "run")) == before  # nothing written
