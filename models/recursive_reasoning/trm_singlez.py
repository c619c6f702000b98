"""TRM with a single latent (the paper's "single z" ablation): no separate answer state z_H.

Each H cycle refines z_L from (z_L + input) L_cycles times, then once more from z_L alone; the heads read z_L.
Everything else (embedding, blocks, heads, ACT wrapper, halting on q_halt > 0) is TRM's.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from models.layers import CosSin
from models.recursive_reasoning import trm


@dataclass
class SingleZCarry:
    z_L: torch.Tensor  # [B, L+P, D], the only state


class SingleZInner(trm.TRMInner):
    def register_start_states(self, config: trm.TRMConfig) -> None:
        self.register_start_state("L_init")  # no H_init: there is no answer state to start

    def empty_carry(self, batch_size: int, device=None) -> SingleZCarry:
        return SingleZCarry(z_L=self.zero_state(batch_size, device))

    def reset_carry(self, reset: torch.Tensor, carry: SingleZCarry) -> SingleZCarry:
        return SingleZCarry(z_L=self.restart(reset, self.L_init, carry.z_L))

    def h_cycle(self, carry: SingleZCarry, x: torch.Tensor, cos_sin: Optional[CosSin]) -> SingleZCarry:
        z_L = carry.z_L
        for _ in range(self.config.L_cycles):
            z_L = self.L_level(z_L, x, cos_sin)
        z_L = self.L_level(z_L, None, cos_sin)  # the step that updates z_H in TRM: the blocks without the input
        return SingleZCarry(z_L=z_L)

    def answer_state(self, carry: SingleZCarry) -> torch.Tensor:
        return carry.z_L


class TinyRecursiveReasoningModel_ACTV1(trm.TinyRecursiveReasoningModel_ACTV1):
    """Class name kept: configs name it `recursive_reasoning.trm_singlez@TinyRecursiveReasoningModel_ACTV1`."""

    inner_class = SingleZInner
