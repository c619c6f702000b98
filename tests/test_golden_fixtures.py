"""Parity with the reference implementation: the fixture checkpoints (attention and MLP-T, float32) replayed
through the loss head in evaluation (4 ACT steps) and training (2 steps with gradients), compared with the
outputs the reference produced (tests/fixtures/README.md gives the tolerances)."""

import json
import os

import pytest
import torch

from models.common import strip_wrapper_prefixes
from models.losses import ACTLossHead
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NAMES = ["trm_att_small", "trm_mlpt_small"]
OUTPUT_KEYS = ["logits", "preds", "q_halt_logits", "q_continue_logits"]
EXACT_METRICS = {"count", "exact_accuracy", "q_halt_accuracy", "steps"}


def load_fixture(name):
    with open(os.path.join(FIXTURES, "fixtures.json")) as f:
        spec = json.load(f)[name]
    state = torch.load(os.path.join(FIXTURES, f"{name}.step_0"), weights_only=True, map_location="cpu")
    trace = torch.load(os.path.join(FIXTURES, f"{name}.trace.pt"), weights_only=True, map_location="cpu")
    return spec, state, trace


def build(spec):
    return ACTLossHead(TinyRecursiveReasoningModel_ACTV1(spec["arch"]), loss_type=spec["loss_type"])


def load_model(name):
    spec, state, trace = load_fixture(name)
    assert all(k.startswith("_orig_mod.model.inner.") for k in state)  # saved from a compiled model
    model = build(spec)
    model.load_state_dict({strip_wrapper_prefixes(k): v for k, v in state.items()}, strict=True)
    return model, trace


def assert_rel_close(got, want, rel, what):
    """max |got - want| <= rel * max |want| (relative to the tensor's scale, not per element)."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert got.shape == want.shape, what
    scale = want.abs().max().clamp_min(1e-30)
    err = (got - want).abs().max()
    assert err <= rel * scale, f"{what}: max abs err {err.item():.3g} vs scale {scale.item():.3g}"


def assert_metrics(metrics, ref, what):
    ref_metrics = {k.removeprefix("metric/"): v for k, v in ref.items() if k.startswith("metric/")}
    assert set(metrics) == set(ref_metrics), what
    for k, v in ref_metrics.items():
        if k in EXACT_METRICS:
            assert metrics[k].item() == v.item(), f"{what} metric {k}"
        else:
            assert_rel_close(metrics[k], v, 1e-4, f"{what} metric {k}")


@pytest.mark.parametrize("name", NAMES)
def test_eval_steps_match_reference(name):
    model, trace = load_model(name)
    batch = trace["batch"]
    model.eval()
    with torch.inference_mode():
        carry = model.initial_carry(batch)
        for i, ref in enumerate(trace["eval_steps"]):
            carry, loss, metrics, outputs, all_halted = model(return_keys=OUTPUT_KEYS, carry=carry, batch=batch)
            what = f"{name} eval step {i}"
            assert_rel_close(outputs["logits"], ref["logits"], 1e-5, what + " logits")
            assert torch.equal(outputs["preds"], ref["preds"]), what + " preds"
            assert_rel_close(outputs["q_halt_logits"], ref["q_halt_logits"], 1e-5, what + " q_halt")
            assert_rel_close(outputs["q_continue_logits"], ref["q_continue_logits"], 1e-5, what + " q_continue")
            assert_rel_close(loss, ref["loss"], 1e-4, what + " loss")
            assert_metrics(metrics, ref, what)
            assert bool(all_halted) == (i == len(trace["eval_steps"]) - 1)


@pytest.mark.parametrize("name", NAMES)
def test_train_steps_match_reference(name):
    model, trace = load_model(name)
    batch_size = trace["batch"]["inputs"].shape[0]
    local_weights = model.model.inner.puzzle_emb.local_weights
    params = dict(model.named_parameters())
    model.train()
    carry = model.initial_carry(trace["batch"])
    for i, ref in enumerate(trace["train_steps"]):
        # As the trace was made: Module.zero_grad() clears the parameters' grads only, so the gradient of the
        # puzzle-embedding rows (a buffer; in training the sign-SGD optimizer clears it) accumulates over the calls.
        model.zero_grad()
        carry, loss, metrics, _, _ = model(return_keys=[], carry=carry, batch=trace["batch"])
        (loss / batch_size).backward()

        what = f"{name} train step {i}"
        assert torch.equal(carry.halted, ref["halted"]), what + " halted"
        assert torch.equal(carry.steps, ref["steps"]), what + " steps"
        assert_rel_close(loss.detach(), ref["loss"], 1e-4, what + " loss")
        assert_metrics(metrics, ref, what)

        grad_keys = [k for k in ref if k.startswith("grad/")]
        assert {k.removeprefix("grad/") for k in grad_keys} == set(params) | {"model.inner.puzzle_emb.local_weights"}
        for k in grad_keys:
            pname = k.removeprefix("grad/")
            grad = local_weights.grad if pname == "model.inner.puzzle_emb.local_weights" else params[pname].grad
            assert_rel_close(grad, ref[k], 1e-4, f"{what} {k}")


def test_mlpt_trace_exercises_the_carry_reset():
    _, _, trace = load_fixture("trm_mlpt_small")
    first, second = trace["train_steps"]
    assert first["halted"].any() and not first["halted"].all()
    assert torch.equal(second["steps"][first["halted"]], torch.ones(int(first["halted"].sum()), dtype=torch.int32))


class _CompiledLike(torch.nn.Module):
    """torch.compile's OptimizedModule names the wrapped module `_orig_mod`, hence the checkpoint prefix."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_prefixed_and_stripped_checkpoints_give_identical_outputs(name):
    spec, state, trace = load_fixture(name)
    stripped = build(spec)
    stripped.load_state_dict({strip_wrapper_prefixes(k): v for k, v in state.items()}, strict=True)
    prefixed = _CompiledLike(build(spec))
    prefixed.load_state_dict(state, strict=True)  # keys exactly as saved

    batch = trace["batch"]
    results = []
    for model in (stripped, prefixed):
        carry = stripped.initial_carry(batch)
        model.eval()
        with torch.inference_mode():
            carry, loss, _, outputs, _ = model(return_keys=OUTPUT_KEYS, carry=carry, batch=batch)
        results.append((loss, outputs))
    (loss_a, out_a), (loss_b, out_b) = results
    assert torch.equal(loss_a, loss_b)
    for k in OUTPUT_KEYS:
        assert torch.equal(out_a[k], out_b[k]), k
