"""TRM's recursion on CPU: no gradient through the first H_cycles - 1 cycles, and a carry detached between ACT
steps."""


import torch
from tests.trm_small import make_model, make_batch, B


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
