"""The speed and memory switches compute the same function: activation recomputation (arch `recompute`) gives the
same outputs, loss, gradients and optimizer state after a step as the plain path; with the opt-in eval early exit
each row halts on its own head."""

import os

import pytest
import torch

from models.losses import ACTLossHead
from models.optimizers import AdamATan2
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
from tests.trm_small import make_batch, small_config


def loss_head(**overrides):
    torch.manual_seed(0)
    model = ACTLossHead(TinyRecursiveReasoningModel_ACTV1(small_config(**overrides)), "stablemax_cross_entropy")
    with torch.no_grad():  # damp the residual branches so the recursion is contractive
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.2)
    return model


def one_train_step(model, batch):
    opt = AdamATan2([p for n, p in model.named_parameters() if "puzzle_emb" not in n], lr=1e-3, weight_decay=0.1)
    model.train()
    carry = model.initial_carry(batch)
    carry, loss, metrics, outputs, _ = model(return_keys=("logits",), carry=carry, batch=batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return carry, loss.detach(), outputs["logits"], grads, opt.state_dict()["state"], model.state_dict()


@pytest.mark.parametrize("variant", [{}, {"mlp_t": True, "pos_encodings": "none"}])
def test_recompute_matches_plain_path(variant):
    batch = make_batch()
    plain = loss_head(**variant)
    recomputed = loss_head(recompute=True, **variant)
    recomputed.load_state_dict(plain.state_dict())
    assert list(recomputed.state_dict()) == list(plain.state_dict())  # the switch adds no checkpoint keys
    a, b = one_train_step(plain, batch), one_train_step(recomputed, batch)
    torch.testing.assert_close(a[0].inner_carry.z_H, b[0].inner_carry.z_H, rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)
    assert a[3].keys() == b[3].keys() and len(a[3]) > 0
    for name in a[3]:
        torch.testing.assert_close(a[3][name], b[3][name], rtol=1e-6, atol=1e-7, msg=name)
    for i in a[4]:
        for key in a[4][i]:
            torch.testing.assert_close(a[4][i][key], b[4][i][key], rtol=1e-6, atol=1e-7)
    for name in a[5]:
        torch.testing.assert_close(a[5][name], b[5][name], rtol=1e-6, atol=1e-7, msg=name)


def test_parity_script_on_cpu():
    """scripts/perf_parity.py (the device parity record) runs on CPU: recompute against eager through pretrain.py's
    own train step differs by nothing, and the compiled paths say why they were skipped."""
    import sys
    from tests.conftest import REPO
    from tests.test_benchmark import TINY

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import perf_parity

    result = perf_parity.main(["--batch", "4", "--seq-len", "9", "--vocab-size", "5", "--steps", "2", *TINY])
    diffs = result["eager_recompute"]["vs_eager"]
    for key in ("loss", "metrics", "z_H", "z_L", "logits", "grads", "adam_state", "puzzle_emb_grad",
                "puzzle_emb_table", "weights"):
        assert diffs[key] <= 1e-6, (key, diffs)
    assert result["forward_dtype"] == "float32"
    for name in ("compiled", "compiled_plain_kernels", "compiled_memory_budget", "compiled_reduce_overhead",
                 "evaluation"):
        assert result[name]["note"].startswith("skipped"), name


def halted_after_first_eval_step(model, batch, q_halt, early_exit):
    """carry.halted after one eval ACT step with each row's q_halt logit forced to `q_halt`."""
    act = model.model
    act.eval_early_exit = early_exit
    real_forward = act.inner.forward

    def forced(carry, data):
        new_carry, logits, (q_h, q_c) = real_forward(carry, data)
        return new_carry, logits, (q_halt.to(q_h.dtype), q_c)

    act.inner.forward = forced
    model.eval()
    with torch.inference_mode():
        carry, _, _, _, _ = model(return_keys=(), carry=model.initial_carry(batch), batch=batch)
    return carry.halted.tolist()


def test_early_exit_halts_each_row_on_its_own_head():
    says_halt = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert halted_after_first_eval_step(loss_head(halt_max_steps=4), make_batch(), says_halt, True) == \
        [True, False, True, False]
    # Off (the reference): no row halts before halt_max_steps, whatever its head says.
    assert halted_after_first_eval_step(loss_head(halt_max_steps=4), make_batch(), says_halt, False) == [False] * 4


def test_evaluation_model_switch_on_cpu():
    """`eval_compile` picks the compiled wrapper only on CUDA; on CPU, or with the switch off, the plain module."""
    import pretrain
    from training.checkpoint import unwrap

    plain = loss_head()
    state = pretrain.TrainState(model=torch.compile(plain), optimizers=[], base_lrs=[], carries=[None],
                                act_generator=torch.Generator(), step=0, total_steps=1, micro_batch_size=4,
                                compiled=True)
    assert pretrain.evaluation_model(state, compile_eval=False) is plain
    assert pretrain.evaluation_model(state, compile_eval=True) is plain  # CPU: eager
    assert unwrap(state.model) is plain and state.eval_compiled is None


def test_compile_memory_budget_reaches_the_compiler_and_is_range_checked():
    import os
    import torch._functorch.config as functorch_config
    import pretrain
    from training.config import ConfigError, compose_config
    from tests.conftest import REPO

    cfg_file = os.path.join(REPO, "config", "cfg_pretrain.yaml")
    config = compose_config(cfg_file, ["+compile_memory_budget=0.6"])
    before = functorch_config.activation_memory_budget
    try:
        compiled = pretrain.compile_model(torch.nn.Linear(2, 2), config)  # lazy: nothing compiles until called
        assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
        assert functorch_config.activation_memory_budget == 0.6
    finally:
        functorch_config.activation_memory_budget = before
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="compile_memory_budget"):
            compose_config(cfg_file, [f"+compile_memory_budget={bad}"])


def test_carry_clone_for_cuda_graphs_copies_every_tensor():
    # In compile_mode=reduce-overhead the carry is cloned after each step (the next graph replay overwrites it).
    from training.train_state import map_carry

    model = TinyRecursiveReasoningModel_ACTV1(small_config())
    batch = make_batch()
    carry, _ = model(model.initial_carry(batch), batch)
    copy = map_carry(torch.clone, carry)
    assert type(copy) is type(carry) and type(copy.inner_carry) is type(carry.inner_carry)
    pairs = [(copy.steps, carry.steps), (copy.halted, carry.halted), (copy.inner_carry.z_H, carry.inner_carry.z_H),
             (copy.inner_carry.z_L, carry.inner_carry.z_L)] + [(copy.current_data[k], v) for k, v in carry.current_data.items()]
    for new, old in pairs:
        assert torch.equal(new, old) and new.data_ptr() != old.data_ptr()
