"""HRM, the hierarchical baseline TRM is compared with: two networks, a low level L_level (fast, L_cycles
updates per H cycle) and a high level H_level (slow, one update per H cycle).

Differences from TRM, all here: the two stacks; the recursion (one-step gradient: only the very last L and H
updates carry gradients); the puzzle prefix is always as short as fits the embedding; the halting rule is
q_halt > q_continue and the continue head always learns from a Q-learning target (the ACT wrapper's
`no_ACT_continue = False` path, with its second inner pass in every training step). Embedding, blocks, heads,
exploration and the loss head are TRM's.
"""

from typing import Optional

import torch
from pydantic import Field

from models.layers import CosSin
from models.recursive_reasoning import trm


class HRMConfig(trm.ACTModelConfig):
    H_layers: int = Field(description="blocks of the high-level network H_level (one update per H cycle)")
    L_cycles: int = Field(description="updates of the low-level network L_level per H cycle")
    L_layers: int = Field(description="blocks of the low-level network L_level")
    mlp_t: bool = Field(False, description="mix tokens with a SwiGLU over the sequence axis instead of attention")

    @property
    def no_ACT_continue(self) -> bool:
        return False  # HRM always trains the continue head and halts on q_halt > q_continue


class HRMInner(trm.TRMInner):
    def build_levels(self, config: HRMConfig) -> None:
        # Construction order (H before L) = the reference's RNG draw order and checkpoint key order.
        self.H_level = trm.ReasoningModule([trm.TRMBlock(config) for _ in range(config.H_layers)])
        self.L_level = trm.ReasoningModule([trm.TRMBlock(config) for _ in range(config.L_layers)])

    def recurse(self, carry: trm.InnerCarry, x: torch.Tensor, cos_sin: Optional[CosSin]) -> trm.InnerCarry:
        H_cycles, L_cycles = self.config.H_cycles, self.config.L_cycles
        z_H, z_L = carry.z_H, carry.z_L
        # All updates but the last L and the last H one without gradients ...
        with torch.no_grad():
            for h in range(H_cycles):
                for l in range(L_cycles):
                    if (h, l) != (H_cycles - 1, L_cycles - 1):
                        z_L = self.L_level(z_L, z_H + x, cos_sin)
                if h != H_cycles - 1:
                    z_H = self.H_level(z_H, z_L, cos_sin)
        # ... and those two with (the one-step gradient approximation).
        z_L = self.L_level(z_L, z_H + x, cos_sin)
        z_H = self.H_level(z_H, z_L, cos_sin)
        return trm.InnerCarry(z_H=z_H, z_L=z_L)


class HierarchicalReasoningModel_ACTV1(trm.TinyRecursiveReasoningModel_ACTV1):
    """Class name kept: configs name it `recursive_reasoning.hrm@HierarchicalReasoningModel_ACTV1`."""

    inner_class = HRMInner
    config_class = HRMConfig
