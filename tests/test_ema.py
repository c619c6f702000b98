"""The weight EMA: its update rule, applying the shadow, wrapper prefixes and exact resume."""

import copy

import pytest
import torch

from models.ema import EMAHelper


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
