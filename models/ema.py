"""Exponential moving average of the trainable parameters, used as the evaluation/checkpoint weights.

Shadow keys are parameter names without wrapper prefixes (`_orig_mod.` from torch.compile, `module.` from
DDP), so a shadow taken from a wrapped model applies to an unwrapped one and back.
"""

from typing import Dict

import torch
from torch import nn

from models.common import strip_wrapper_prefixes

def _trainable(module: nn.Module):
    for name, param in module.named_parameters():
        if param.requires_grad:
            yield strip_wrapper_prefixes(name), param


class EMAHelper:
    def __init__(self, mu: float = 0.999):
        self.mu = mu
        self.shadow: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def register(self, module: nn.Module) -> None:
        """Start the average at the module's current trainable parameters (buffers are not averaged)."""
        self.shadow = {name: param.detach().clone() for name, param in _trainable(module)}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """shadow <- (1 - mu)·θ + mu·shadow, evaluated in that order as the reference does."""
        for name, param in _trainable(module):
            shadow = self.shadow[name]
            shadow.copy_((1.0 - self.mu) * param + self.mu * shadow)

    @torch.no_grad()
    def ema(self, module: nn.Module) -> None:
        """Overwrite the module's trainable parameters with the shadow, in place."""
        for name, param in _trainable(module):
            param.copy_(self.shadow[name])

    def state_dict(self) -> dict:
        return {"mu": self.mu, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Accepts this class's state_dict, or a bare {parameter name: tensor} shadow (any wrapper prefixes).

        If a shadow is already registered, the names must match and values are copied into the registered
        tensors (keeping their device); otherwise the loaded tensors become the shadow."""
        if "shadow" in state_dict and isinstance(state_dict["shadow"], dict):
            self.mu = state_dict.get("mu", self.mu)
            state_dict = state_dict["shadow"]
        loaded = {strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
        if not self.shadow:
            self.shadow = {k: v.detach().clone() for k, v in loaded.items()}
            return
        if loaded.keys() != self.shadow.keys():
            missing, unexpected = sorted(self.shadow.keys() - loaded.keys()), sorted(loaded.keys() - self.shadow.keys())
            raise KeyError(f"EMA shadow mismatch: missing {missing}, unexpected {unexpected}")
        for name, value in loaded.items():
            self.shadow[name].copy_(value)
