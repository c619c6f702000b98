"""Parity with the reference implementation: the fixture checkpoints (attention and MLP-T, float32) replayed
through the loss head in evaluation (4 ACT steps) and training (2 steps with gradients), compared with the
outputs the reference produced (tests/fixtures/README.md gives the tolerances)."""

import json
import os

import pytest
import torch

from models.losses import ACTLossHead
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
from tests.golden import check_eval_steps, check_prefixed_and_stripped_agree, check_train_steps, load_trace, load_weights

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NAMES = ["trm_att_small", "trm_mlpt_small"]


def load_fixture(name):
    with open(os.path.join(FIXTURES, "fixtures.json")) as f:
        spec = json.load(f)[name]
    return (spec, *load_trace(FIXTURES, name))


def build(spec):
    return ACTLossHead(TinyRecursiveReasoningModel_ACTV1(spec["arch"]), loss_type=spec["loss_type"])


def load_model(name):
    spec, state, trace = load_fixture(name)
    return load_weights(build(spec), state), trace


@pytest.mark.parametrize("name", NAMES)
def test_eval_steps_match_reference(name):
    model, trace = load_model(name)
    check_eval_steps(model, trace, name)


@pytest.mark.parametrize("name", NAMES)
def test_train_steps_match_reference(name):
    model, trace = load_model(name)
    check_train_steps(model, trace, name)


def test_mlpt_trace_exercises_the_carry_reset():
    _, _, trace = load_fixture("trm_mlpt_small")
    first, second = trace["train_steps"]
    assert first["halted"].any() and not first["halted"].all()
    assert torch.equal(second["steps"][first["halted"]], torch.ones(int(first["halted"].sum()), dtype=torch.int32))


@pytest.mark.parametrize("name", NAMES)
def test_prefixed_and_stripped_checkpoints_give_identical_outputs(name):
    spec, state, trace = load_fixture(name)
    check_prefixed_and_stripped_agree(lambda: build(spec), state, trace)
