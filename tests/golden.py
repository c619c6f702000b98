"""Replaying a golden trace of the reference (tests/fixtures, tolerances in tests/fixtures/README.md) through a
loss head: shared by tests/test_golden_fixtures.py (TRM) and tests/test_variants.py (the other architectures)."""

import os

import torch

from models.common import strip_wrapper_prefixes

OUTPUT_KEYS = ["logits", "preds", "q_halt_logits", "q_continue_logits"]
EXACT_METRICS = {"count", "exact_accuracy", "q_halt_accuracy", "steps"}
PUZZLE_ROWS = "model.inner.puzzle_emb.local_weights"  # the per-batch puzzle-embedding rows the gradient reaches


def load_trace(folder, name):
    """(state dict as saved, trace) of fixture `name` in `folder`."""
    state = torch.load(os.path.join(folder, f"{name}.step_0"), weights_only=True, map_location="cpu")
    trace = torch.load(os.path.join(folder, f"{name}.trace.pt"), weights_only=True, map_location="cpu")
    return state, trace


def load_weights(model, state):
    """Load a fixture's weights, saved as the reference saves a compiled model, into a plain loss head."""
    assert all(k.startswith("_orig_mod.model.inner.") for k in state)
    model.load_state_dict({strip_wrapper_prefixes(k): v for k, v in state.items()}, strict=True)
    return model


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


def check_eval_steps(model, trace, name):
    """Evaluation from a fresh carry: every ACT step's outputs, loss and metrics as in the trace; all rows halt at
    the last step only."""
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


def check_train_steps(model, trace, name):
    """Two training calls from a fresh carry: halting, steps, loss, metrics and every gradient as in the trace."""
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
        assert_metrics(metrics, ref, what)  # same key set: q_continue_loss where the continue head trains

        grad_keys = [k for k in ref if k.startswith("grad/")]
        assert {k.removeprefix("grad/") for k in grad_keys} == set(params) | {PUZZLE_ROWS}
        for k in grad_keys:
            pname = k.removeprefix("grad/")
            grad = local_weights.grad if pname == PUZZLE_ROWS else params[pname].grad
            assert_rel_close(grad, ref[k], 1e-4, f"{what} {k}")


class CompiledLike(torch.nn.Module):
    """torch.compile's OptimizedModule names the wrapped module `_orig_mod`, hence the checkpoint prefix."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def check_prefixed_and_stripped_agree(build, state, trace):
    """The same weights loaded with the saved `_orig_mod.` keys (into a compiled-like wrapper) and stripped (into
    a plain model) give identical outputs."""
    stripped = build()
    stripped.load_state_dict({strip_wrapper_prefixes(k): v for k, v in state.items()}, strict=True)
    prefixed = CompiledLike(build())
    prefixed.load_state_dict(state, strict=True)  # keys exactly as saved

    batch = trace["batch"]
    results = []
    for model in (stripped, prefixed):
        model.eval()
        with torch.inference_mode():
            carry = stripped.initial_carry(batch)
            carry, loss, _, outputs, _ = model(return_keys=OUTPUT_KEYS, carry=carry, batch=batch)
        results.append((loss, outputs))
    (loss_a, out_a), (loss_b, out_b) = results
    assert torch.equal(loss_a, loss_b)
    for k in OUTPUT_KEYS:
        assert torch.equal(out_a[k], out_b[k]), k
