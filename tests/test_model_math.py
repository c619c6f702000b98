"""Maths of the model package on CPU: losses, ACT halting and carry, recursion gradients, layer sizes, init,
the sparse sign-SGD, EMA and AdamATan2 (pure version against a float64 transcription of the rule)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.common import trunc_normal_init_
from models.ema import EMAHelper
from models.layers import SwiGLU, swiglu_intermediate_size
from models.losses import IGNORE_LABEL_ID, ACTLossHead, softmax_cross_entropy, stablemax_cross_entropy
from models.optimizers import AdamATan2, _adam_atan2_foreach, adam_atan2_backend
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
from models.sparse_embedding import CastedSparseEmbedding, CastedSparseEmbeddingSignSGD_Distributed

B, L, V = 4, 16, 5


def small_config(**overrides):
    cfg = dict(batch_size=B, seq_len=L, vocab_size=V, num_puzzle_identifiers=3, puzzle_emb_ndim=32, puzzle_emb_len=2,
               H_cycles=2, L_cycles=2, H_layers=0, L_layers=1, hidden_size=32, expansion=2, num_heads=2,
               pos_encodings="rope", halt_max_steps=4, halt_exploration_prob=0.0, forward_dtype="float32",
               causal=False)  # `causal` is injected by pretrain and must be ignored
    cfg.update(overrides)
    return cfg


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = TinyRecursiveReasoningModel_ACTV1(small_config(**overrides))
    # Damp the residual branches so the recursion is contractive (docs/compatibility.md section 13).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.2)
    return model


def make_batch(seed=1, batch_size=B):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1, V, (batch_size, L), generator=g, dtype=torch.int32)
    labels = torch.randint(1, V, (batch_size, L), generator=g, dtype=torch.int32)
    labels[0, :3] = IGNORE_LABEL_ID
    ids = torch.randint(0, 3, (batch_size,), generator=g, dtype=torch.int32)
    return {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids}


# --- losses ---------------------------------------------------------------------------------------------------

def test_stablemax_cross_entropy_matches_float64_hand_computation():
    logits = torch.tensor([[[2.0, -1.0, 0.5, -3.0], [0.0, 0.0, -0.25, 4.0], [1.0, 2.0, 3.0, -1.0]]])  # [1, 3, 4]
    labels = torch.tensor([[0, 3, IGNORE_LABEL_ID]])
    loss = stablemax_cross_entropy(logits, labels)
    assert loss.dtype == torch.float64 and loss.shape == (1, 3)

    def s(x):  # x+1 for x >= 0, 1/(1-x) below (the 1e-30 epsilon vanishes in float64 here)
        return x + 1 if x >= 0 else 1 / (1 - x)

    for t, y in enumerate(labels[0].tolist()):
        if y == IGNORE_LABEL_ID:
            assert loss[0, t].item() == 0.0
            continue
        row = [s(float(x)) for x in logits[0, t]]
        expected = -math.log(row[y] / sum(row))
        assert loss[0, t].item() == pytest.approx(expected, rel=1e-12)

    # An explicit valid_mask wins over ignore_index.
    masked = stablemax_cross_entropy(logits, labels, valid_mask=torch.tensor([[True, False, False]]))
    assert masked[0, 0] == loss[0, 0] and masked[0, 1] == 0 and masked[0, 2] == 0


def test_softmax_cross_entropy_accepts_valid_mask():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, V, generator=g)
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[1, 4] = IGNORE_LABEL_ID
    mask = labels != IGNORE_LABEL_ID
    expected = F.cross_entropy(logits.view(-1, V), labels.clamp_min(0).view(-1), reduction="none").view(2, 6) * mask
    torch.testing.assert_close(softmax_cross_entropy(logits, labels), expected)
    torch.testing.assert_close(softmax_cross_entropy(logits, labels, valid_mask=mask), expected)
    narrower = mask.clone()
    narrower[0, 0] = False
    out = softmax_cross_entropy(logits, labels, valid_mask=narrower)
    assert out[0, 0] == 0 and out[0, 1] == expected[0, 1]


@pytest.mark.parametrize("loss_type", ["stablemax_cross_entropy", "softmax_cross_entropy"])
def test_loss_head_metrics_and_losses(loss_type):
    head = ACTLossHead(make_model(), loss_type)
    batch = make_batch()
    batch["labels"][2] = IGNORE_LABEL_ID  # a row without labels: counts nowhere, but its q target is "correct"
    head.eval()
    carry = head.initial_carry(batch)
    for _ in range(4):
        carry, loss, metrics, outputs, all_halted = head(return_keys=["logits", "preds", "q_halt_logits"], carry=carry, batch=batch)
    assert bool(all_halted)
    assert set(outputs) == {"logits", "preds", "q_halt_logits"} and not outputs["logits"].requires_grad

    labels, preds, q_halt = batch["labels"], outputs["preds"], outputs["q_halt_logits"]
    mask = labels != IGNORE_LABEL_ID
    n = mask.sum(-1)
    correct = mask & (preds == labels)
    seq_correct = correct.sum(-1) == n
    valid = n > 0  # every row halted at the last eval step
    ce = stablemax_cross_entropy if loss_type == "stablemax_cross_entropy" else softmax_cross_entropy
    lm_loss = (ce(outputs["logits"], labels) / n.clamp_min(1).unsqueeze(-1)).sum()
    q_halt_loss = F.binary_cross_entropy_with_logits(q_halt, seq_correct.float(), reduction="sum")

    assert metrics["count"].item() == valid.sum().item() == 3
    assert metrics["accuracy"].item() == pytest.approx((correct.sum(-1) / n.clamp_min(1))[valid].sum().item(), rel=1e-6)
    assert metrics["exact_accuracy"].item() == (valid & seq_correct).sum().item()
    assert metrics["q_halt_accuracy"].item() == (valid & ((q_halt >= 0) == seq_correct)).sum().item()
    assert metrics["steps"].item() == 4 * 3
    assert metrics["lm_loss"].item() == pytest.approx(lm_loss.item(), rel=1e-6)
    assert metrics["q_halt_loss"].item() == pytest.approx(q_halt_loss.item(), rel=1e-6)
    assert loss.item() == pytest.approx(lm_loss.item() + 0.5 * q_halt_loss.item(), rel=1e-6)
    assert "q_continue_loss" not in metrics


def test_unknown_loss_type_fails():
    with pytest.raises(ValueError):
        ACTLossHead(make_model(), "cross_entropy")


# --- ACT halting and carry --------------------------------------------------------------------------------------

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


# --- recursion gradients ----------------------------------------------------------------------------------------

def test_no_gradient_through_the_first_h_cycles():
    model = make_model(H_cycles=3)
    model.eval()  # puzzle embedding as a lookup; gradients still flow to parameters
    inner = model.inner
    batch = make_batch()
    with torch.no_grad():
        inner.q_head.weight.normal_(std=0.1)
    start = inner.reset_carry(torch.ones(B, dtype=torch.bool), inner.empty_carry(B))

    def loss_of(logits, q):
        return logits.square().mean() + q[0].square().mean()

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    _, logits, q = inner(start, batch)
    loss_of(logits, q).backward()
    got = grads()

    # By hand: two cycles without grad, then one with grad, from the same start.
    model.zero_grad()
    cos_sin = inner.rotary_emb()
    x = inner.input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
    with torch.no_grad():
        c = inner.h_cycle(inner.h_cycle(start, x, cos_sin), x, cos_sin)
    c = inner.h_cycle(c, x, cos_sin)
    logits_h = inner.lm_head(c.z_H)[:, 2:]
    q_h = inner.q_head(c.z_H[:, 0])
    loss_of(logits_h, (q_h[:, 0],)).backward()
    want = grads()
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)

    # Sensitivity check: backprop through all three cycles gives different gradients.
    model.zero_grad()
    x = inner.input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
    c = inner.h_cycle(inner.h_cycle(inner.h_cycle(start, x, cos_sin), x, cos_sin), x, cos_sin)
    loss_of(inner.lm_head(c.z_H)[:, 2:], (inner.q_head(c.z_H[:, 0])[:, 0],)).backward()
    full = grads()
    name = "inner.L_level.layers.0.self_attn.qkv_proj.weight"
    assert not torch.allclose(full[name], got[name], rtol=1e-3, atol=0)


def test_new_carry_is_detached():
    model = make_model()
    model.train()
    batch = make_batch()
    carry, outputs = model(model.initial_carry(batch), batch)
    assert not carry.inner_carry.z_H.requires_grad and not carry.inner_carry.z_L.requires_grad
    assert outputs["logits"].requires_grad


# --- layers and init --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden,inter", [(512, 1536), (97, 512), (916, 2560), (64, 256)])
def test_swiglu_intermediate_sizes(hidden, inter):
    assert swiglu_intermediate_size(hidden, 4) == inter
    with torch.device("meta"):
        mlp = SwiGLU(hidden, 4)
    assert mlp.gate_up_proj.weight.shape == (2 * inter, hidden)
    assert mlp.down_proj.weight.shape == (hidden, inter)


def test_trunc_normal_std_and_bounds():
    torch.manual_seed(0)
    for std in (1.0, 0.02):
        t = trunc_normal_init_(torch.empty(1_000_000), std=std)
        assert t.std().item() == pytest.approx(std, rel=5e-3)
        assert t.mean().item() == pytest.approx(0.0, abs=5e-3 * std)
        bound = 2 * std / math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(math.sqrt(2)))
        assert bound == pytest.approx(2 * 1.13685 * std, rel=1e-5)
        assert t.abs().max().item() <= bound * (1 + 1e-6)
        assert t.abs().max().item() > 0.99 * bound

    state = torch.get_rng_state()
    z = trunc_normal_init_(torch.full((10,), 3.0), std=0)
    assert torch.all(z == 0) and torch.equal(torch.get_rng_state(), state)  # std 0: zeros, no draw

    h = trunc_normal_init_(torch.empty(4096, dtype=torch.bfloat16), std=1)
    assert h.dtype == torch.bfloat16


def test_learned_positions_and_no_positions_build_and_run():
    for pos in ("learned", "none"):
        model = make_model(pos_encodings=pos)
        assert hasattr(model.inner, "embed_pos") == (pos == "learned")
        assert not hasattr(model.inner, "rotary_emb")
        batch = make_batch()
        model.eval()
        with torch.no_grad():
            _, out = model(model.initial_carry(batch), batch)
        assert torch.isfinite(out["logits"]).all()


def test_config_ignores_unknown_keys_and_rejects_bad_combinations():
    TinyRecursiveReasoningModel_ACTV1(small_config(some_future_key=1))
    with pytest.raises(ValueError):
        TinyRecursiveReasoningModel_ACTV1(small_config(forward_dtype="float99"))
    with pytest.raises(ValueError):
        TinyRecursiveReasoningModel_ACTV1(small_config(forward_dtype="int32"))
    with pytest.raises(ValueError):
        TinyRecursiveReasoningModel_ACTV1(small_config(puzzle_emb_ndim=100, puzzle_emb_len=3))  # 100 > 3 * 32
    with pytest.raises(ValueError):
        TinyRecursiveReasoningModel_ACTV1(small_config(puzzle_emb_ndim=0, puzzle_emb_len=2))
    model = TinyRecursiveReasoningModel_ACTV1(small_config(puzzle_emb_ndim=0, puzzle_emb_len=0))
    batch = make_batch()
    model.eval()
    with torch.no_grad():
        _, out = model(model.initial_carry(batch), batch)
    assert out["logits"].shape == (B, L, V)


# --- sparse puzzle embedding + sign-SGD -------------------------------------------------------------------------

def test_sparse_embedding_train_and_eval_lookup():
    emb = CastedSparseEmbedding(5, 3, batch_size=4, init_std=1.0, cast_to=torch.float32)
    ids = torch.tensor([4, 0, 4, 2], dtype=torch.int32)
    emb.eval()
    torch.testing.assert_close(emb(ids), emb.weights[ids])
    emb.train()
    out = emb(ids)
    assert out is emb.local_weights or out.data_ptr() == emb.local_weights.data_ptr()
    torch.testing.assert_close(emb.local_weights.detach(), emb.weights[ids])
    assert torch.equal(emb.local_ids, ids)
    assert set(emb.state_dict()) == {"weights"}
    emb.to(torch.device("cpu"), torch.float64)  # after a move the local buffer is still a grad-receiving leaf
    assert emb.local_weights.is_leaf and emb.local_weights.requires_grad


def test_sparse_sign_sgd_matches_dense_implementation():
    torch.manual_seed(0)
    emb = CastedSparseEmbedding(6, 3, batch_size=5, init_std=1.0, cast_to=torch.float32)
    emb.train()
    ids = torch.tensor([1, 4, 1, 5, 3], dtype=torch.int32)
    target = torch.randn(5, 3)
    ((emb(ids) - target) ** 2).sum().backward()
    local_grad = emb.local_weights.grad.clone()
    before = emb.weights.clone()

    lr, wd = 0.1, 0.5
    opt = CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=1, lr=lr, weight_decay=wd)
    opt.step()

    dense_grad = torch.zeros_like(before).index_add_(0, ids.long(), local_grad)  # duplicates summed
    touched = torch.zeros(6, dtype=torch.bool)
    touched[ids.long()] = True
    expected = torch.where(touched.unsqueeze(-1), before * (1 - lr * wd) - lr * torch.sign(dense_grad), before)
    torch.testing.assert_close(emb.weights, expected, rtol=0, atol=1e-6)
    assert torch.equal(emb.weights[~touched], before[~touched])  # untouched rows: no decay either

    opt.zero_grad()
    assert emb.local_weights.grad is None or torch.all(emb.local_weights.grad == 0)


def test_sparse_sign_sgd_world_size_without_process_group_is_local():
    emb = CastedSparseEmbedding(4, 2, batch_size=2, init_std=1.0, cast_to=torch.float32)
    emb.train()
    emb(torch.tensor([0, 2], dtype=torch.int32)).sum().backward()
    before = emb.weights.clone()
    CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=8, lr=0.5, weight_decay=0.0).step()
    torch.testing.assert_close(emb.weights[[0, 2]], before[[0, 2]] - 0.5)


# --- EMA --------------------------------------------------------------------------------------------------------

class _Wrapped(torch.nn.Module):
    """Stands in for torch.compile's wrapper: the same parameters under an `_orig_mod.` prefix."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner


def test_ema_update_maths_copy_and_prefixes():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[1].bias.requires_grad_(False)  # not trainable: not averaged
    ema = EMAHelper(mu=0.9)
    ema.register(_Wrapped(net))
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight"}

    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    expected = dict(start)
    for k in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.5 + k)
        ema.update(_Wrapped(net))
        for n, p in net.named_parameters():
            if n in expected:
                expected[n] = (1 - 0.9) * p.detach() + 0.9 * expected[n]
    for n in ema.shadow:
        torch.testing.assert_close(ema.shadow[n], expected[n], rtol=0, atol=0)

    live = {n: p.detach().clone() for n, p in net.named_parameters()}
    averaged = copy.deepcopy(net)
    ema.ema(averaged)  # shadow taken from a wrapped module applies to the bare one
    for n, p in averaged.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n] if n in ema.shadow else live[n], rtol=0, atol=0)
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), live[n])  # original untouched

    # Exact resume: a new helper loaded from state_dict continues identically.
    resumed = EMAHelper()
    resumed.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert resumed.mu == 0.9
    ema.update(net)
    resumed.update(net)
    for n in ema.shadow:
        assert torch.equal(ema.shadow[n], resumed.shadow[n])

    # A bare shadow dict with prefixed names (the fork's --ema-shadow files) loads too.
    bare = EMAHelper(mu=0.9)
    bare.register(net)
    bare.load_state_dict({"_orig_mod." + k: v for k, v in ema.shadow.items()})
    for n in ema.shadow:
        assert torch.equal(bare.shadow[n], ema.shadow[n])
    with pytest.raises(KeyError):
        bare.load_state_dict({"0.weight": ema.shadow["0.weight"]})


# --- AdamATan2 --------------------------------------------------------------------------------------------------

def _adam_atan2_float64(param, grads, lr, betas, wd):
    """The rule of docs/compatibility.md section 9, written out in float64."""
    b1, b2 = betas
    p, m, v = param.double().clone(), torch.zeros_like(param, dtype=torch.float64), torch.zeros_like(param, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = m + (1 - b1) * (g - m)
        v = v + (1 - b2) * (g * g - v)
        p = p - lr / (1 - b1**t) * torch.atan2(m, v.sqrt() / math.sqrt(1 - b2**t))
    return p, m, v


def test_adam_atan2_pure_matches_float64_rule():
    torch.manual_seed(0)
    lr, betas, wd = 1e-2, (0.9, 0.95), 0.1
    w = torch.nn.Parameter(torch.randn(37, 5))
    b = torch.nn.Parameter(torch.randn(5))
    frozen = torch.nn.Parameter(torch.randn(3))  # never gets a grad: skipped, no decay, no state
    frozen_before = frozen.detach().clone()
    opt = AdamATan2([w, b, frozen], lr=lr, betas=betas, weight_decay=wd)
    w0, b0 = w.detach().clone(), b.detach().clone()

    g_w = [torch.randn(37, 5) * 10 ** (-k % 3) for k in range(6)]
    g_b = [torch.randn(5) for _ in range(6)]
    g_w[2][0] = 0  # zero grad and zero moments give atan2(0, 0) = 0 at the first step of these rows
    for gw, gb in zip(g_w, g_b):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()

    for param, start, gs in ((w, w0, g_w), (b, b0, g_b)):
        p, m, v = _adam_atan2_float64(start, gs, lr, betas, wd)
        state = opt.state[param]
        assert state["step"].dtype == torch.float32 and state["step"].shape == () and state["step"].item() == 6
        torch.testing.assert_close(param.detach().double(), p, rtol=0, atol=1e-6)
        torch.testing.assert_close(state["exp_avg"].double(), m, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(state["exp_avg_sq"].double(), v, rtol=1e-5, atol=1e-10)
    assert torch.equal(frozen.detach(), frozen_before) and frozen not in opt.state


def test_adam_atan2_lr_zero_allowed_and_state_dict_round_trip():
    w = torch.nn.Parameter(torch.ones(4))
    opt = AdamATan2([w], lr=0.0)  # pretrain builds it with lr 0 and sets the scheduled lr each step
    w.grad = torch.ones(4)
    opt.step()
    assert torch.equal(w.detach(), torch.ones(4))
    opt2 = AdamATan2([w], lr=0.0)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[w]["step"].item() == 1


def test_adam_atan2_low_precision_params_use_fp32_math():
    torch.manual_seed(0)
    p16 = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
    p32 = torch.nn.Parameter(p16.detach().float())
    g = torch.randn(64).to(torch.bfloat16)
    p16.grad, p32.grad = g.clone(), g.float()
    AdamATan2([p16], lr=1e-2).step()
    AdamATan2([p32], lr=1e-2).step()
    assert p16.dtype == torch.bfloat16
    assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))


@pytest.mark.skipif(adam_atan2_backend is None or not torch.cuda.is_available(), reason="needs CUDA and the adam_atan2 package's CUDA backend")
def test_adam_atan2_fused_matches_pure():
    import adam_atan2_backend

    torch.manual_seed(0)
    lr, b1, b2, wd = 1e-3, 0.9, 0.95, 0.1
    p_fused = [torch.randn(4096, device="cuda"), torch.randn(63, 17, device="cuda")]
    p_pure = [p.clone() for p in p_fused]
    states = [[[torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
               [torch.zeros((), device="cuda") for _ in ps]] for ps in (p_fused, p_pure)]
    for _ in range(20):
        grads = [torch.randn_like(p) * 1e-3 for p in p_fused]
        for ps, (m, v, s), fused in ((p_fused, states[0], True), (p_pure, states[1], False)):
            torch._foreach_add_(s, 1)
            if fused:
                adam_atan2_backend.adam_atan2_cuda_impl_(ps, grads, m, v, s, lr, b1, b2, wd)
            else:
                _adam_atan2_foreach(ps, grads, m, v, s, lr, b1, b2, wd)
    for a, b in zip(p_fused, p_pure):
        # Same arithmetic up to how nvcc fuses inside the kernel's atan2: rare 1-ulp differences.
        assert (a != b).float().mean().item() < 0.01
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_init_draw_order_matches_reference():
    """Same seed, same weights as the reference: replay its draw order by hand (docs/compatibility.md section 4)."""
    cfg = small_config(pos_encodings="learned", L_layers=2)
    torch.manual_seed(7)
    model = TinyRecursiveReasoningModel_ACTV1(cfg)

    torch.manual_seed(7)
    D, S = 32, L + 2
    inter = swiglu_intermediate_size(D, 2)

    def draw(*shape, std, dtype=torch.float32):
        return trunc_normal_init_(torch.empty(*shape, dtype=dtype), std=std)

    expected = {"inner.embed_tokens.embedding_weight": draw(V, D, std=D**-0.5),
                "inner.lm_head.weight": draw(V, D, std=D**-0.5)}
    draw(2, D, std=D**-0.5)  # q_head weight: drawn, then zeroed
    expected["inner.embed_pos.embedding_weight"] = draw(S, D, std=D**-0.5)
    for i in range(2):
        prefix = f"inner.L_level.layers.{i}."
        expected[prefix + "self_attn.qkv_proj.weight"] = draw(3 * D, D, std=D**-0.5)
        expected[prefix + "self_attn.o_proj.weight"] = draw(D, D, std=D**-0.5)
        expected[prefix + "mlp.gate_up_proj.weight"] = draw(2 * inter, D, std=D**-0.5)
        expected[prefix + "mlp.down_proj.weight"] = draw(D, inter, std=inter**-0.5)
    expected["inner.H_init"] = draw(D, std=1)
    expected["inner.L_init"] = draw(D, std=1)

    state = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    assert torch.all(state["inner.puzzle_emb.weights"] == 0)  # zero init, no draw
