"""TRM with a multi-scale latent (the paper's "multi-scale z" ablation): six latent slots z_L1..z_L6.

L step i of an H cycle rewrites slot i from (sum of all slots) with the injection (z_H + input), so with
L_cycles <= 6 each cycle touches the first L_cycles slots once; z_H is then refined from the sum of the slots.
Everything else (embedding, blocks, heads, ACT wrapper, halting) is TRM's.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from pydantic import model_validator

from models.layers import CosSin
from models.recursive_reasoning import trm

NUM_SLOTS = 6


class Hier6Config(trm.TRMConfig):
    @model_validator(mode="after")
    def _cycles_fit_slots(self):
        if self.L_cycles > NUM_SLOTS:
            raise ValueError(f"L_cycles {self.L_cycles} > {NUM_SLOTS}: each L step owns one of the {NUM_SLOTS} latent slots")
        return self


@dataclass
class Hier6Carry:
    z_H: torch.Tensor  # [B, L+P, D]
    z_L: torch.Tensor  # [6, B, L+P, D], slot i = z_L{i+1}


class Hier6Inner(trm.TRMInner):
    def register_start_states(self, config: Hier6Config) -> None:
        self.register_start_state("H_init")
        for i in range(1, NUM_SLOTS + 1):
            self.register_start_state(f"L{i}_init")  # checkpoint names L1_init..L6_init

    def slot_inits(self) -> torch.Tensor:
        return torch.stack([getattr(self, f"L{i}_init") for i in range(1, NUM_SLOTS + 1)])  # [6, D]

    def empty_carry(self, batch_size: int, device=None) -> Hier6Carry:
        return Hier6Carry(z_H=self.zero_state(batch_size, device),
                          z_L=self.zero_state(batch_size, device, slots=(NUM_SLOTS,)))

    def reset_carry(self, reset: torch.Tensor, carry: Hier6Carry) -> Hier6Carry:
        return Hier6Carry(z_H=self.restart(reset, self.H_init, carry.z_H),
                          z_L=torch.where(reset.view(1, -1, 1, 1), self.slot_inits()[:, None, None, :], carry.z_L))

    def h_cycle(self, carry: Hier6Carry, x: torch.Tensor, cos_sin: Optional[CosSin]) -> Hier6Carry:
        z_H, slots = carry.z_H, list(carry.z_L.unbind(0))
        for i in range(self.config.L_cycles):
            slots[i] = self.L_level(sum(slots), z_H + x, cos_sin)
        z_H = self.L_level(z_H, sum(slots), cos_sin)
        return Hier6Carry(z_H=z_H, z_L=torch.stack(slots))


class TinyRecursiveReasoningModel_ACTV1(trm.TinyRecursiveReasoningModel_ACTV1):
    """Class name kept: configs name it `recursive_reasoning.trm_hier6@TinyRecursiveReasoningModel_ACTV1`."""

    inner_class = Hier6Inner
    config_class = Hier6Config
