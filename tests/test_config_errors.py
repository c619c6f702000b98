"""Config errors are one line with exit code 2, Hydra's included: unknown keys get a close match ("did you mean
H_cycles?"), values out of range and the loss head's and evaluators' settings are refused at start
(training/config.py, models/arch.py), and under torchrun the line is printed once, on a line of its own. Set-up
reports the project's own errors in one line and lets any other exception (a bug) through."""

import os
import subprocess

import pytest

from tests.conftest import ENV, REPO, launch, one_error_line, run_pretrain_in_process
from training.config import check_command_line, compose_config
from utils.errors import ConfigError, DataError

CFG = os.path.join(REPO, "config", "cfg_pretrain.yaml")
TINY = ["evaluators=[]", "global_batch_size=8", "epochs=1", "eval_interval=1", "arch.hidden_size=16",
        "arch.num_heads=2", "arch.L_layers=1", "++device=cpu"]


def arguments(data_dir, tmp_path, *overrides):
    return [f"data_paths=[{data_dir}]", *TINY, f"++checkpoint_path={tmp_path / 'ckpt'}", *overrides]


def pretrain(data_dir, tmp_path, *overrides, nproc=1):
    cmd = launch("pretrain.py", nproc) + arguments(data_dir, tmp_path, *overrides)
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override, fragment", [
    ("arch.H_cycle=3", "did you mean H_cycles?"),  # Hydra's error (key not in the yaml)
    ("+arch.H_cycle=3", "did you mean H_cycles?"),  # added with +: the model's field check
    ("lrr=1", "did you mean lr?"),
    ("arch=trmm", "choose one of hrm,"),
    ("lr=[1", "not valid Hydra syntax"),
    ("run_name=x", "+run_name"),
    ("arch.puzzle_emb_ndim=0", "puzzle_emb_len"),  # the model config's own (multi-line pydantic) error
    ("lr=-1", "'lr' must be greater than or equal to 0"),
], ids=["hydra-unknown", "plus-unknown", "top-level", "arch-choice", "syntax", "needs-plus", "model", "range"])
def test_config_error_is_one_line_exit_2(sudoku_dataset, tmp_path, capsys, override, fragment):
    rc, _, err = run_pretrain_in_process(arguments(sudoku_dataset, tmp_path, override), capsys)
    assert rc == 2, err
    one_error_line(err, fragment)
    assert not (tmp_path / "ckpt").exists()


def test_config_error_of_the_real_command_is_one_line_exit_2(sudoku_dataset, tmp_path):
    # The same path as above through a real `python pretrain.py`: nothing else reaches stderr.
    result = pretrain(sudoku_dataset, tmp_path, "lrr=1")
    assert result.returncode == 2, result.stderr
    one_error_line(result.stderr, "did you mean lr?")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("override, key", [
    ("lr=-1", "lr"), ("puzzle_emb_lr=-0.1", "puzzle_emb_lr"), ("weight_decay=-1", "weight_decay"),
    ("puzzle_emb_weight_decay=-1", "puzzle_emb_weight_decay"), ("beta1=1", "beta1"), ("beta2=-0.5", "beta2"),
    ("ema_rate=1.5", "ema_rate"), ("lr_min_ratio=2", "lr_min_ratio"), ("lr_warmup_steps=-1", "lr_warmup_steps"),
    ("global_batch_size=0", "global_batch_size"), ("+micro_batch_size=0", "micro_batch_size"),
    ("epochs=0", "epochs"), ("eval_interval=0", "eval_interval"), ("keep_last_checkpoints=0", "keep_last_checkpoints"),
    ("checkpoint_every_steps=0", "checkpoint_every_steps"), ("arch.H_cycles=0", "arch.H_cycles"),
    ("arch.L_cycles=-1", "arch.L_cycles"), ("arch.halt_max_steps=0", "arch.halt_max_steps"),
    ("arch.halt_exploration_prob=1.5", "arch.halt_exploration_prob"), ("arch.hidden_size=0", "arch.hidden_size"),
])
def test_out_of_range_values_are_refused(override, key):
    with pytest.raises(ConfigError) as info:
        compose_config(CFG, ["data_paths=[x]", override])
    message = str(info.value)
    assert "\n" not in message and key in message and "must be" in message, message


def test_valid_edges_are_accepted():
    config = compose_config(CFG, ["data_paths=[x]", "lr=0", "beta1=0", "ema_rate=1", "lr_min_ratio=0",
                                  "arch.halt_exploration_prob=1", "arch.H_cycles=1"])
    assert config.lr == 0 and config.ema_rate == 1


def test_torchrun_prints_the_error_once_on_its_own_line(sudoku_dataset, tmp_path):
    result = pretrain(sudoku_dataset, tmp_path, "global_batch_size=33", nproc=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error: " in line and "global_batch_size" in line]
    assert errors == ["error: global_batch_size=33 is not divisible by the world size 2; choose a multiple of 2"], \
        result.stderr
    assert 'pretrain.py", line' not in result.stderr  # torchrun reports the failed ranks; no traceback of ours
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("override, fragment", [
    ("+arch.loss.loss_typ=softmax_cross_entropy", "did you mean loss_type? (arch.loss.loss_type=...)"),
    ("arch.loss.loss_type=cross_entropy", "'arch.loss.loss_type' of ACTLossHead must be 'stablemax_cross_entropy' or"),
    ("evaluators=[{name: arc@ARC, aggregated_votin: False}]", "did you mean aggregated_voting?"),
    ("evaluators=[{name: arc@ARC, submission_K: two}]", "'submission_K' of ARC must be a valid integer"),
    ("evaluators=[{name: arcc@ARC}]", "no module evaluators.arcc"),
], ids=["loss-key", "loss-value", "evaluator-key", "evaluator-value", "evaluator-name"])
def test_loss_and_evaluator_settings_are_checked_with_the_config(capsys, override, fragment):
    with pytest.raises(SystemExit) as info:
        check_command_line(CFG, ["data_paths=[x]", override])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize("error", [DataError("data/x/train/dataset.json is not valid JSON; rebuild the dataset"),
                                   ValueError("a bug: not the user's input")], ids=["input-error", "bug"])
def test_setup_reports_input_errors_in_one_line_and_lets_bugs_through(monkeypatch, capsys, error):
    import pretrain

    def failing_setup(_hydra_config):
        raise error

    monkeypatch.setattr(pretrain, "setup", failing_setup)
    if isinstance(error, DataError):
        with pytest.raises(SystemExit) as info:
            pretrain.run(None)
        assert info.value.code == 2 and capsys.readouterr().err == f"error: {error}\n"
    else:  # a genuine bug keeps its exception (and traceback)
        with pytest.raises(ValueError, match="a bug"):
            pretrain.run(None)
