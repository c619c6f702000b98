"""`python pretrain.py --help` (training/config_help.py) lists every config key with its default and a description,
marks with a + the keys the yaml leaves unset (those the README's commands set with +key=...), lists the arch keys of
the chosen arch, and leaves Hydra's own --hydra-help working (issue 10 item 8)."""

import glob
import inspect
import os
import re
import subprocess
import sys

import pytest
import yaml

from models.arch import INJECTED_ARCH_FIELDS
from tests.conftest import ENV, REPO
from training.config import PretrainConfig, check_command_line, compose_raw
from utils.functions import load_model_class

CFG = os.path.join(REPO, "config", "cfg_pretrain.yaml")
ARCH_FILES = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "config", "arch", "*.yaml")))
KEY_LINE = re.compile(r"^  (\+?)([A-Za-z_][\w.]*)=(\S*)(?: +(\S.*))?$")


def help_keys(capsys, *argv):
    """{key: (needs +, shown default, description)} from the help that check_command_line prints (exit 0)."""
    with pytest.raises(SystemExit) as info:
        check_command_line(CFG, list(argv))
    assert info.value.code == 0
    keys, last = {}, None
    for line in capsys.readouterr().out.splitlines():
        match = KEY_LINE.match(line)
        if match:
            plus, key, default, description = match.groups()
            keys[key] = [plus == "+", default, description or ""]
            last = key
        elif last and line.startswith(" " * 30) and line.strip():
            keys[last][2] = (keys[last][2] + " " + line.strip()).strip()
        else:
            last = None
    return keys


def test_every_training_key_has_a_default_and_a_description(capsys):
    keys = help_keys(capsys, "--help")
    with open(CFG) as f:
        in_yaml = set(yaml.safe_load(f))
    for key in PretrainConfig.model_fields:
        if key == "arch":
            continue
        assert key in keys, f"{key} missing from --help"
        plus, default, description = keys[key]
        assert plus == (key not in in_yaml), key  # Hydra needs the + exactly for keys the yaml leaves unset
        assert default and len(description) > 10, (key, default, description)
    # The keys users set with a + (the reference's README, resume): listed, marked, with their defaults.
    for key, default in (("run_name", "null"), ("checkpoint_path", "null"), ("project_name", "null"),
                         ("resume", "False"), ("load_checkpoint", "null")):
        assert keys[key][:2] == [True, default], key
    assert keys["lr"][:2] == [False, "0.0001"] and keys["epochs"][:2] == [False, "100000"]
    assert keys["arch.loss.loss_type"][1] == "stablemax_cross_entropy"
    assert keys["aggregated_voting"][1] == "True"  # the default evaluator's settings
    assert set(INJECTED_ARCH_FIELDS).isdisjoint(k.removeprefix("arch.") for k in keys)  # not settable


@pytest.mark.parametrize("arch", ARCH_FILES)
def test_the_chosen_archs_keys_are_listed(capsys, arch):
    keys = help_keys(capsys, f"arch={arch}", "--help")
    arch_yaml = compose_raw(CFG, [f"arch={arch}"])["arch"]  # the arch file with the files it extends
    fields = load_model_class(arch_yaml["name"]).config_class.model_fields
    for field in set(fields) - INJECTED_ARCH_FIELDS:
        plus, default, description = keys[f"arch.{field}"]
        assert plus == (field not in arch_yaml), field
        assert default and len(description) > 10, (field, default, description)
    assert keys["arch.name"][1] == arch_yaml["name"]


def test_overrides_and_config_name_change_the_defaults_shown(capsys):
    keys = help_keys(capsys, "--config-name", "cfg_quickstart", "arch.L_cycles=5", "-h")
    assert keys["global_batch_size"][1] == "64" and keys["arch.L_cycles"][1] == "5"
    assert "aggregated_voting" not in keys  # the quick start has no evaluators


def test_every_plus_key_in_the_docs_commands_is_listed(capsys):
    keys = help_keys(capsys, "--help")
    commands = "".join(open(p).read() for p in glob.glob(os.path.join(REPO, "scripts", "*.sh")))
    for path in [os.path.join(REPO, "README.md")] + glob.glob(os.path.join(REPO, "docs", "*.md")):
        commands += "".join(re.findall(r"```bash\n(.*?)```", open(path).read(), flags=re.S))
    used = set(re.findall(r"(?<![\w+])\+([A-Za-z_][\w.]*)=", commands))
    assert {"run_name", "checkpoint_path", "arch.recompute"} <= used
    for key in used:
        assert key in keys and keys[key][0], f"+{key} (used in a documented command) is not listed with a +"


def test_constructor_settings_of_the_loss_head_and_evaluators_are_described():
    for cls, positional in ((load_model_class("losses@ACTLossHead"), {"self", "model"}),
                            (load_model_class("arc@ARC", "evaluators."), {"self", "data_path", "eval_metadata"})):
        settings = set(inspect.signature(cls.__init__).parameters) - positional
        assert set(cls.CONFIG_HELP) == settings, cls


def test_help_and_hydra_help_from_the_command_line():
    ours = subprocess.run([sys.executable, "pretrain.py", "--help"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert ours.returncode == 0 and "+run_name=null" in ours.stdout and "arch.L_cycles=6" in ours.stdout, ours.stderr
    hydra = subprocess.run([sys.executable, "pretrain.py", "--hydra-help"], cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert hydra.returncode == 0 and "Hydra" in hydra.stdout and "--hydra-help" in hydra.stdout, hydra.stderr
