"""Config composition in process (training/config.py): what the arch files give users, key for key."""

import os

import pytest
import yaml

from tests.conftest import REPO
from training.config import compose_config

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
