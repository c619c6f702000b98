"""Configuration in process (training/config.py): what the arch files compose to, key for key, and the one-line
messages of parsing and of the start-up checks."""

import os

import pytest
import yaml

from tests.conftest import REPO
from training.config import (check_batch_divides, check_data_paths, compose_config, compose_raw, parse_config,
                             shell_safe)
from utils.errors import ConfigError, did_you_mean

CFG = os.path.join(REPO, "config", "cfg_pretrain.yaml")

# config/arch/trm.yaml as users get it (and as trm_mlp.yaml, trm_singlez.yaml and trm_hier6.yaml spelled it out
# in full before they extended it), in the file's key order.
TRM = {
    "name": "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1",
    "loss": {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"},
    "halt_exploration_prob": 0.1, "halt_max_steps": 16, "H_cycles": 3, "L_cycles": 6, "H_layers": 0, "L_layers": 2,
    "hidden_size": 512, "num_heads": 8, "expansion": 4, "puzzle_emb_ndim": 512, "pos_encodings": "rope",
    "forward_dtype": "bfloat16", "mlp_t": False, "puzzle_emb_len": 16, "no_ACT_continue": True,
}


def arch(*overrides):
    return compose_config(CFG, list(overrides)).arch.model_dump()


@pytest.mark.parametrize("name, differences", [
    ("trm", {}),
    ("trm_mlp", {"mlp_t": True}),
    ("trm_singlez", {"name": "recursive_reasoning.trm_singlez@TinyRecursiveReasoningModel_ACTV1"}),
    ("trm_hier6", {"name": "recursive_reasoning.trm_hier6@TinyRecursiveReasoningModel_ACTV1"}),
])
def test_trm_family_arch_files_compose_to_trm_plus_their_differences(name, differences):
    composed = arch(f"arch={name}")
    expected = {**TRM, **differences}
    assert list(composed.items()) == list(expected.items())  # values and key order (step_<N>.config.yaml)
    # Overrides and interpolations still act on the composed file: puzzle_emb_ndim follows hidden_size.
    assert arch(f"arch={name}", "arch.hidden_size=64")["puzzle_emb_ndim"] == 64


def test_extending_arch_files_hold_only_their_differences():
    for name, keys in (("trm_mlp", {"mlp_t"}), ("trm_singlez", {"name"}), ("trm_hier6", {"name"})):
        with open(os.path.join(REPO, "config", "arch", f"{name}.yaml")) as f:
            raw = yaml.safe_load(f)
        assert raw.pop("defaults") == ["trm", "_self_"] and set(raw) == keys, name


# Parsing and checks in process: the messages users get, one line each.

def raw_config(*overrides):
    return compose_raw(CFG, ["data_paths=[x]", *overrides])


@pytest.mark.parametrize("change, message", [
    ({"global_batch_size": None}, "config key 'global_batch_size' is required; set it on the command line "
                                  "(global_batch_size=...)"),
    ({"global_batch_size": "abc"}, "config key 'global_batch_size' must be a valid integer, unable to parse string "
                                   "as an integer, got 'abc'; set global_batch_size=<a valid value>"),
    ({"ema": "maybe"}, "config key 'ema' must be a valid boolean, unable to interpret input, got 'maybe'; "
                       "set ema=<a valid value>"),
], ids=["missing", "not-an-int", "not-a-bool"])
def test_parse_config_names_the_key_and_the_fix(change, message):
    raw = {k: v for k, v in {**raw_config(), **change}.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert str(info.value) == message


def test_unknown_arch_field_gets_a_close_match_and_the_known_fields():
    raw = raw_config()
    with pytest.raises(ConfigError) as info:
        parse_config({**raw, "arch": {**raw["arch"], "L_cycle": 3}})
    message = str(info.value)
    assert message.startswith("unknown arch field 'arch.L_cycle' for recursive_reasoning.trm@"
                              "TinyRecursiveReasoningModel_ACTV1; did you mean L_cycles? (arch.L_cycles=...); "
                              "known fields: H_cycles, H_layers, L_cycles, L_layers, ")
    assert "batch_size" not in message.split("known fields: ")[1].split(", ")  # injected from the dataset


def test_parsed_config_holds_the_composed_values():
    config = parse_config(raw_config("lr=2e-4", "arch.L_cycles=4", "+run_name=r1"))
    assert (config.lr, config.arch.model_extra["L_cycles"], config.run_name) == (2e-4, 4, "r1")
    assert config.data_paths == ["x"] and config.evaluators[0].name == "arc@ARC"


def test_close_matches_and_safe_names():
    assert did_you_mean("arch.H_cycle", ["arch.H_cycles", "arch.L_cycles", "lr"]) == \
        "; did you mean H_cycles? (arch.H_cycles=...)"
    assert did_you_mean("lr", ["arch.lr_x"]) == ""  # only keys of the same level are suggested
    assert did_you_mean("zzz", ["lr"]) == ""
    assert shell_safe("my sudoku;run") == "my-sudoku-run"


def test_batch_and_data_path_checks():
    assert check_batch_divides(32, 2, None) == 16 and check_batch_divides(32, 2, 8) == 16
    for args, message in (((33, 2, None), "global_batch_size=33 is not divisible by the world size 2; choose a "
                                          "multiple of 2"),
                          ((32, 2, 5), "micro_batch_size=5 must divide the per-rank batch 16 (global_batch_size 32 "
                                       "/ 2 ranks)")):
        with pytest.raises(ConfigError) as info:
            check_batch_divides(*args)
        assert str(info.value) == message
    with pytest.raises(ConfigError, match=r"^data_paths: dataset folder /nonexistent/d does not exist; build it "
                                          r"first \(see README, 'Datasets'\)$"):
        check_data_paths(["/nonexistent/d"], "data_paths")
    check_data_paths([REPO], "data_paths")
