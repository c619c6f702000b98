"""The ACT wrapper on CPU: q-head init, the initial carry, halting in evaluation and training (q_halt,
exploration), halted rows restarting from the start states, and the continue target of no_ACT_continue=False."""

import copy

import pytest
import torch

from models.losses import ACTLossHead
from tests.trm_small import make_model, make_batch, B, L, V


def test_q_head_init_and_initial_halt_logits():
    model = make_model()
    assert torch.all(model.inner.q_head.weight == 0)
    assert torch.all(model.inner.q_head.bias == -5)
    batch = make_batch()
    model.eval()
    with torch.no_grad():
        _, outputs = model(model.initial_carry(batch), batch)
    assert torch.all(outputs["q_halt_logits"] == -5) and torch.all(outputs["q_continue_logits"] == -5)
    assert outputs["q_halt_logits"].dtype == torch.float32
    assert outputs["logits"].shape == (B, L, V)


def test_initial_carry():
    model = make_model()
    batch = make_batch()
    carry = model.initial_carry(batch)
    assert carry.halted.dtype == torch.bool and carry.halted.all()
    assert carry.steps.dtype == torch.int32 and torch.all(carry.steps == 0)
    assert carry.inner_carry.z_H.shape == carry.inner_carry.z_L.shape == (B, L + 2, 32)
    assert set(carry.current_data) == set(batch)


def test_eval_runs_exactly_halt_max_steps_even_if_q_halt_says_stop():
    model = make_model()
    with torch.no_grad():
        model.inner.q_head.bias.fill_(5.0)  # q_halt = +5 > 0 everywhere: training would halt at once
    batch = make_batch()
    model.eval()
    carry = model.initial_carry(batch)
    with torch.no_grad():
        for step in range(1, 5):
            carry, _ = model(carry, batch)
            assert torch.all(carry.steps == step)
            assert bool(carry.halted.all()) == (step == 4)


def test_train_halts_on_positive_q_halt_or_max_steps():
    batch = make_batch()
    model = make_model()
    model.train()
    with torch.no_grad():
        model.inner.q_head.bias.fill_(5.0)
    carry, _ = model(model.initial_carry(batch), batch)
    assert carry.halted.all() and torch.all(carry.steps == 1)

    with torch.no_grad():
        model.inner.q_head.bias.fill_(-5.0)  # never halts by itself: runs to halt_max_steps
    carry = model.initial_carry(batch)
    for step in range(1, 5):
        carry, _ = model(carry, batch)
        assert bool(carry.halted.any()) == (step == 4)
    assert torch.all(carry.steps == 4)


@pytest.mark.parametrize("use_generator", [True, False])
def test_train_exploration_min_steps(use_generator):
    batch_size = 32
    model = make_model(halt_exploration_prob=0.5, batch_size=batch_size, halt_max_steps=5)
    model.train()
    with torch.no_grad():
        model.inner.q_head.bias.fill_(5.0)  # every row would halt at once without exploration
    batch = make_batch(batch_size=batch_size)

    model_gen = torch.Generator().manual_seed(123) if use_generator else None
    replay_gen = torch.Generator().manual_seed(123) if use_generator else None
    carry = model.initial_carry(batch)
    expected_steps = torch.zeros(batch_size, dtype=torch.int32)
    expected_halted = torch.ones(batch_size, dtype=torch.bool)
    saw_explore = False
    for _ in range(6):
        expected_steps = torch.where(expected_halted, 0, expected_steps) + 1
        if not use_generator:
            torch.manual_seed(1000 + _)
        with torch.no_grad():
            carry, _out = model(carry, batch, generator=model_gen)
        if not use_generator:
            torch.manual_seed(1000 + _)
        u = torch.rand(batch_size, generator=replay_gen)
        m = torch.randint(2, 6, (batch_size,), dtype=torch.int32, generator=replay_gen)
        min_steps = (u < 0.5) * m
        expected_halted = (expected_steps >= 5) | (expected_steps >= min_steps)
        assert torch.equal(carry.steps, expected_steps)
        assert torch.equal(carry.halted, expected_halted)
        saw_explore |= bool((~expected_halted).any())
    assert saw_explore  # some rows were held back by exploration


def test_halted_rows_restart_and_take_the_new_batch_row():
    model = make_model()
    model.eval()  # halting fixed by hand below; eval mode keeps it deterministic
    old, new = make_batch(seed=1), make_batch(seed=2)
    with torch.no_grad():
        carry, _ = model(model.initial_carry(old), old)
        carry, _ = model(carry, old)
        carry.halted = torch.tensor([True, False, True, False])
        before = copy.deepcopy(carry)
        carry, outputs = model(carry, new)

        reset = torch.tensor([True, False, True, False])
        for k in old:
            expected = torch.where(reset.view(-1, *([1] * (old[k].ndim - 1))), new[k], old[k])
            assert torch.equal(carry.current_data[k], expected), k
        assert carry.steps.tolist() == [1, 3, 1, 3]

        # Restarted rows behave as a fresh puzzle on the new rows; the others continue from their state.
        fresh_carry, fresh_out = model(model.initial_carry(new), new)
        continued = model.inner(before.inner_carry, old)
        torch.testing.assert_close(outputs["logits"][reset], fresh_out["logits"][reset], rtol=0, atol=0)
        torch.testing.assert_close(outputs["logits"][~reset], continued[1][~reset], rtol=0, atol=0)
        torch.testing.assert_close(carry.inner_carry.z_H[reset], fresh_carry.inner_carry.z_H[reset], rtol=0, atol=0)


def test_reset_carry_uses_init_states():
    model = make_model()
    inner = model.inner
    carry = inner.empty_carry(B)
    carry.z_H.normal_()
    carry.z_L.normal_()
    flag = torch.tensor([False, True, False, True])
    out = inner.reset_carry(flag, carry)
    for zn, init in (("z_H", inner.H_init), ("z_L", inner.L_init)):
        z_old, z_new = getattr(carry, zn), getattr(out, zn)
        assert torch.equal(z_new[flag], init.expand(2, L + 2, 32))
        assert torch.equal(z_new[~flag], z_old[~flag])


def test_no_act_continue_false_trains():
    # The reference crashes here (docs/compatibility.md section 12, item 4); the target comes from an extra
    # no-grad inner pass.
    head = ACTLossHead(make_model(no_ACT_continue=False), "stablemax_cross_entropy")
    head.train()
    batch = make_batch()
    carry = head.initial_carry(batch)
    carry, loss, metrics, _, _ = head(return_keys=[], carry=carry, batch=batch)
    assert "q_continue_loss" in metrics
    loss.backward()
    assert head.model.inner.q_head.weight.grad is not None

    # target = sigmoid(max(next q_halt, next q_continue)) from one more inner step on the new carry.
    model = head.model
    with torch.no_grad():
        model.inner.q_head.weight.normal_(std=0.1)
        carry0 = model.initial_carry(batch)
        new_carry, outputs = model(carry0, batch)
        _, _, (nh, nc) = model.inner(new_carry.inner_carry, new_carry.current_data)
    torch.testing.assert_close(outputs["target_q_continue"], torch.sigmoid(torch.maximum(nh, nc)))
