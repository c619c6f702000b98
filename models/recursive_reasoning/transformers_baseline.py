"""The plain-transformer baseline: one stack of H_layers attention blocks applied once per ACT step, no
recursion inside a step, a single state z_H.

Differences from TRM, all here: the stack (`H_level`), the carry (z_H only), one update with gradients per
step, the puzzle prefix as short as fits the embedding, and the halting switches: `act_enabled` (Q-head halting
in training, rule q_halt > q_continue, with exploration) and `act_inference` (the same rule in evaluation,
which then also returns `actual_steps`). The continue target is computed only when the caller passes
`compute_target_q=True`, which the training loop does not (as in the reference), so the continue head gets
no loss. Embedding, blocks, heads and the loss head are TRM's.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from pydantic import Field, field_validator

from models.layers import CosSin
from models.recursive_reasoning import trm


class BaselineConfig(trm.ACTModelConfig):
    H_cycles: int = Field(description="unused: kept so the published configs validate")
    H_layers: int = Field(description="attention blocks, applied once per ACT step")
    act_enabled: bool = Field(True, description="Q-head halting (q_halt > q_continue) and exploration in training; "
                                                "False: every row runs halt_max_steps")
    act_inference: bool = Field(False, description="evaluation rows halt on the same rule (outputs then include "
                                                   "actual_steps)")

    @field_validator("pos_encodings")
    @classmethod
    def _has_positions(cls, v: str) -> str:
        # Attention alone is permutation invariant: without positions the grid layout would be lost.
        if v not in ("rope", "learned"):
            raise ValueError(f"the transformer baseline needs pos_encodings rope or learned, got {v!r}")
        return v

    @property
    def mlp_t(self) -> bool:
        return False  # attention blocks only

    @property
    def no_ACT_continue(self) -> bool:
        return False  # the rule is q_halt > q_continue


@dataclass
class BaselineCarry:
    z_H: torch.Tensor  # [B, L+P, D]


class BaselineInner(trm.TRMInner):
    def build_levels(self, config: BaselineConfig) -> None:
        self.H_level = trm.ReasoningModule([trm.TRMBlock(config) for _ in range(config.H_layers)])

    def register_start_states(self, config: BaselineConfig) -> None:
        self.register_start_state("H_init")

    def empty_carry(self, batch_size: int, device=None) -> BaselineCarry:
        return BaselineCarry(z_H=self.zero_state(batch_size, device))

    def reset_carry(self, reset: torch.Tensor, carry: BaselineCarry) -> BaselineCarry:
        return BaselineCarry(z_H=self.restart(reset, self.H_init, carry.z_H))

    def recurse(self, carry: BaselineCarry, x: torch.Tensor, cos_sin: Optional[CosSin]) -> BaselineCarry:
        return BaselineCarry(z_H=self.H_level(carry.z_H, x, cos_sin))  # input added once, then the blocks


class Model_ACTV2(trm.TinyRecursiveReasoningModel_ACTV1):
    """Class name kept: configs name it `recursive_reasoning.transformers_baseline@Model_ACTV2`."""

    inner_class = BaselineInner
    config_class = BaselineConfig

    def act_in_training(self) -> bool:
        return self.config.act_enabled

    def trains_continue_head(self, compute_target_q: bool) -> bool:
        return compute_target_q

    def forward(self, carry, batch, generator=None, compute_target_q: bool = False):
        carry, outputs = super().forward(carry, batch, generator=generator, compute_target_q=compute_target_q)
        if not self.training and self.config.act_enabled and self.config.act_inference:
            # Evaluation rows halt on their own; nothing else of the step depends on it.
            with torch.no_grad():
                carry.halted = carry.halted | self.q_says_halt(outputs["q_halt_logits"], outputs["q_continue_logits"])
            outputs["actual_steps"] = carry.steps
        return carry, outputs
