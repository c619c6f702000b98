"""Parity of the four other architectures (single z, multi-scale z, HRM, transformer baseline) with the
reference: golden traces replayed through the loss head in evaluation (4 ACT steps) and training (2 steps with
gradients), and the checkpoint layout pinned key by key (tests/fixtures/variants, tolerances in
tests/fixtures/README.md)."""

import json
import os

import pytest
import torch

from models.common import strip_wrapper_prefixes
from models.losses import ACTLossHead
from utils.functions import load_model_class

from tests.golden import (OUTPUT_KEYS, check_eval_steps, check_prefixed_and_stripped_agree, check_train_steps,
                          load_trace, load_weights)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "variants")
with open(os.path.join(FIXTURES, "variants.json")) as f:
    SPECS = json.load(f)
NAMES = sorted(SPECS)


def build(spec, **arch):
    return ACTLossHead(load_model_class(spec["name"])({**spec["arch"], **arch}), loss_type=spec["loss_type"])


def load(name):
    return (SPECS[name], *load_trace(FIXTURES, name))


def load_model(name, **arch):
    spec, state, trace = load(name)
    return load_weights(build(spec, **arch), state), trace


def test_all_four_variants_have_fixtures():
    assert NAMES == ["hrm_small", "transformers_baseline_small", "trm_hier6_small", "trm_singlez_small"]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_layout_equals_reference(name):
    spec = SPECS[name]
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in build(spec).state_dict().items()]
    want = [(k, shape, dtype) for k, (shape, dtype) in spec["state_dict"].items()]
    assert got == want  # keys, order, shapes, dtypes
    _, state, _ = load(name)
    assert [strip_wrapper_prefixes(k) for k in state] == [k for k, _, _ in want]


@pytest.mark.parametrize("name", NAMES)
def test_eval_steps_match_reference(name):
    model, trace = load_model(name)
    check_eval_steps(model, trace, name)


@pytest.mark.parametrize("recompute", [False, True])  # the memory switch must not change the maths
@pytest.mark.parametrize("name", NAMES)
def test_train_steps_match_reference(name, recompute):
    model, trace = load_model(name, recompute=recompute)
    check_train_steps(model, trace, name)


def test_only_hrm_trains_the_continue_head():
    for name in NAMES:
        _, _, trace = load(name)
        has = ["metric/q_continue_loss" in ref for ref in trace["train_steps"]]
        assert has == [name == "hrm_small"] * 2, name


def test_traces_continue_from_the_carry():
    # Rows that did not halt after the first training call carry their state into the second one (in the
    # baseline's trace some rows halt and restart, which exercises the reset too).
    for name in NAMES:
        _, _, trace = load(name)
        first, second = trace["train_steps"]
        assert not first["halted"].all(), name
        assert torch.equal(second["steps"], torch.where(first["halted"], 1, 2).to(torch.int32)), name


@pytest.mark.parametrize("name", NAMES)
def test_prefixed_and_stripped_checkpoints_give_identical_outputs(name):
    spec, state, trace = load(name)
    check_prefixed_and_stripped_agree(lambda: build(spec), state, trace)


ARCH_CLASSES = {
    "trm_singlez": "recursive_reasoning.trm_singlez@TinyRecursiveReasoningModel_ACTV1",
    "trm_hier6": "recursive_reasoning.trm_hier6@TinyRecursiveReasoningModel_ACTV1",
    "hrm": "recursive_reasoning.hrm@HierarchicalReasoningModel_ACTV1",
    "transformers_baseline": "recursive_reasoning.transformers_baseline@Model_ACTV2",
}


@pytest.mark.parametrize("arch", sorted(ARCH_CLASSES))
def test_arch_configs_compose_with_the_reference_names_and_overrides(arch):
    from training.config import compose_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overrides = [f"arch={arch}", "arch.H_cycles=2", "arch.hidden_size=96"]
    config = compose_config(os.path.join(repo, "config", "cfg_pretrain.yaml"), overrides)
    assert config.arch.name == ARCH_CLASSES[arch]
    fields = config.arch.model_extra
    assert fields["H_cycles"] == 2 and fields["puzzle_emb_ndim"] == 96  # interpolation follows hidden_size
    defaults = {
        "trm_singlez": dict(H_cycles=2, L_cycles=6, L_layers=2, puzzle_emb_len=16, no_ACT_continue=True),
        "trm_hier6": dict(H_cycles=2, L_cycles=6, L_layers=2, puzzle_emb_len=16, no_ACT_continue=True),
        "hrm": dict(L_cycles=2, H_layers=4, L_layers=4, num_heads=8, mlp_t=False),
        "transformers_baseline": dict(H_layers=8, num_heads=12, act_enabled=True, act_inference=False),
    }[arch]
    assert {k: fields[k] for k in defaults} == defaults
    assert fields["halt_max_steps"] == 16 and fields["pos_encodings"] == "rope"
    # The model builds from the composed fields plus what the dataset injects.
    model_cls = load_model_class(config.arch.name)
    model = model_cls({**fields, "batch_size": 2, "seq_len": 9, "vocab_size": 5,
                       "num_puzzle_identifiers": 1, "forward_dtype": "float32", "causal": False})
    batch = {"inputs": torch.ones(2, 9, dtype=torch.int32), "labels": torch.ones(2, 9, dtype=torch.int32),
             "puzzle_identifiers": torch.zeros(2, dtype=torch.int32)}
    model.eval()
    with torch.inference_mode():
        carry, outputs = model(model.initial_carry(batch), batch)
    assert outputs["logits"].shape == (2, 9, 5)


def test_variant_configs_refuse_what_they_cannot_run():
    import pydantic

    base = dict(SPECS["trm_hier6_small"]["arch"])
    with pytest.raises(pydantic.ValidationError, match="L_cycles 7"):
        load_model_class(SPECS["trm_hier6_small"]["name"])({**base, "L_cycles": 7})
    base = dict(SPECS["transformers_baseline_small"]["arch"])
    with pytest.raises(pydantic.ValidationError, match="rope or learned"):
        load_model_class(SPECS["transformers_baseline_small"]["name"])({**base, "pos_encodings": "none"})


def test_baseline_switches():
    spec = SPECS["transformers_baseline_small"]
    _, state, trace = load("transformers_baseline_small")
    batch = trace["batch"]

    def run(training, compute_target_q=False, **arch):
        model = load_model_class(spec["name"])({**spec["arch"], **arch})
        model.load_state_dict({strip_wrapper_prefixes(k).removeprefix("model."): v for k, v in state.items()})
        model.train(training)
        with torch.no_grad():
            return model(model.initial_carry(batch), batch, compute_target_q=compute_target_q)

    # act_enabled False: training runs halt_max_steps steps like evaluation (the trace halts some rows).
    carry, _ = run(True, act_enabled=False)
    assert not carry.halted.any()
    carry, outputs = run(True)
    assert carry.halted.any() and "target_q_continue" not in outputs
    _, outputs = run(True, compute_target_q=True)
    assert outputs["target_q_continue"].shape == (8,)
    # act_inference: evaluation halts on the Q rule and reports the steps.
    carry, outputs = run(False, act_inference=True)
    assert torch.equal(carry.halted, outputs["q_halt_logits"] > outputs["q_continue_logits"])
    assert torch.equal(outputs["actual_steps"], carry.steps)
    carry, outputs = run(False)
    assert not carry.halted.any() and "actual_steps" not in outputs


@pytest.mark.parametrize("name", NAMES)
def test_carry_survives_a_training_state_round_trip(name, tmp_path):
    # Exact resume saves the ACT carries: each variant's own carry must come back as it was and continue alike.
    from training.train_state import carry_from_plain, carry_to_plain

    model, trace = load_model(name)
    batch = trace["batch"]
    model.train()
    with torch.no_grad():
        carry, *_ = model(return_keys=[], carry=model.initial_carry(batch), batch=batch)
    torch.save(carry_to_plain(carry), tmp_path / "carry.pt")
    restored = carry_from_plain(torch.load(tmp_path / "carry.pt", weights_only=True), model, torch.device("cpu"))
    assert type(restored.inner_carry) is type(carry.inner_carry)
    with torch.no_grad():
        outs = [model(return_keys=OUTPUT_KEYS, carry=c, batch=batch) for c in (carry, restored)]
    for k in OUTPUT_KEYS:
        assert torch.equal(outs[0][3][k], outs[1][3][k]), k
