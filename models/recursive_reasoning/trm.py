"""TRM: a tiny network applied recursively, wrapped in adaptive computation time (ACT).

One shared stack of blocks (`L_level`) refines a latent z_L from (z_H + input) L_cycles times, then refines the
answer state z_H from z_L; that H cycle repeats H_cycles times per ACT step (only the last one with gradients).
The ACT wrapper carries (z_H, z_L) across steps and a Q-head decides when a row halts. Attention vs MLP-T
token mixing and rope / learned / no positions are switches of the config.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from pydantic import BaseModel, Field, field_validator, model_validator
from torch import nn

from models.common import trunc_normal_init_
from models.layers import Attention, CastedEmbedding, CastedLinear, CosSin, RotaryEmbedding, SwiGLU, rms_norm
from models.sparse_embedding import CastedSparseEmbedding

Batch = Dict[str, torch.Tensor]  # inputs [B, L], labels [B, L], puzzle_identifiers [B]


class ACTModelConfig(BaseModel):
    """Fields every architecture of this family shares (TRM and the variants built on its parts)."""

    # Unknown keys (e.g. the `causal` that pretrain injects) are ignored, as the reference does.
    # The descriptions are what `python pretrain.py --help` prints for arch.<field>.
    # Set from the dataset and the batch by pretrain.py (models/arch.INJECTED_ARCH_FIELDS), not by the user:
    batch_size: int = Field(description="per-process rows per forward; sizes the sparse puzzle-embedding buffer")
    seq_len: int = Field(description="tokens per example, from the dataset")
    num_puzzle_identifiers: int = Field(description="rows of the puzzle embedding table, from the dataset")
    vocab_size: int = Field(description="token vocabulary size, from the dataset")

    puzzle_emb_ndim: int = Field(0, description="width of the per-puzzle embedding (0: no puzzle embedding)")
    H_cycles: int = Field(description="H cycles per ACT step, each refining the answer state z_H from z_L "
                                      "(only the last one with gradients)")
    H_layers: int = Field(description="blocks of the high-level network")

    hidden_size: int = Field(description="model width")
    expansion: float = Field(description="SwiGLU hidden width as a multiple of hidden_size")
    num_heads: int = Field(description="attention heads (head width = hidden_size // num_heads)")
    pos_encodings: str = Field(description="positions: rope, learned, or anything else for none")

    rms_norm_eps: float = Field(1e-5, description="epsilon of the RMS norms")
    rope_theta: float = Field(10000.0, description="base of the rotary position frequencies")

    halt_max_steps: int = Field(description="most ACT steps per puzzle (evaluation always runs this many)")
    halt_exploration_prob: float = Field(description="probability that a training row must run a random 2.."
                                                     "halt_max_steps steps before it may halt (ACT exploration)")

    forward_dtype: str = Field("bfloat16", description="dtype of the forward: bfloat16 or float32 (float32 on the CPU)")
    # Memory switch: keep only each block's input in the gradient cycle and recompute the rest in backward
    # (one more forward of that cycle, about +20% step time); the maths is unchanged.
    recompute: bool = Field(False, description="recompute the gradient cycle's activations in backward: much less "
                                               "training memory for about +20% step time, same maths")
    # Speed switch: Triton kernels for SwiGLU and (where backward runs) RoPE on CUDA; elsewhere the plain layers.
    fused_kernels: bool = Field(True, description="on CUDA, Triton kernels for SwiGLU and, where backward runs, RoPE "
                                                  "(models/kernels.py): same maths, less element-wise traffic; "
                                                  "False (and under recompute): the plain PyTorch layers")

    @field_validator("forward_dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        dtype = getattr(torch, v, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"forward_dtype must name a torch floating dtype (bfloat16, float32), got {v!r}")
        return v

    @property
    def prefix_len(self) -> int:
        """P: sequence positions taken by the puzzle embedding in front of the tokens (as few as fit it)."""
        return -(self.puzzle_emb_ndim // -self.hidden_size)  # ceil division

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.forward_dtype)


class TRMConfig(ACTModelConfig):
    H_layers: int = Field(description="unused: TRM has a single network; kept so the published configs validate")
    L_cycles: int = Field(description="refinements of the latent z_L per H cycle")
    L_layers: int = Field(description="blocks of the one shared network")

    mlp_t: bool = Field(False, description="mix tokens with a SwiGLU over the sequence axis (TRM-MLP) instead of "
                                           "attention")
    puzzle_emb_len: int = Field(16, description="sequence positions reserved for the puzzle embedding (0: "
                                                "ceil(puzzle_emb_ndim / hidden_size))")
    no_ACT_continue: bool = Field(True, description="halt on q_halt > 0 alone (False: also learn a q_continue "
                                                    "target, one more inner pass per training step)")

    @model_validator(mode="after")
    def _consistent_prefix(self):
        # The reference crashes on the first forward in this case (z has L+P positions, the input only L).
        if self.puzzle_emb_ndim == 0 and self.puzzle_emb_len > 0:
            raise ValueError("puzzle_emb_ndim = 0 needs puzzle_emb_len = 0 (there is no puzzle embedding to prepend)")
        if self.puzzle_emb_ndim > self.prefix_len * self.hidden_size:
            raise ValueError(f"puzzle_emb_ndim {self.puzzle_emb_ndim} does not fit in puzzle_emb_len "
                             f"{self.puzzle_emb_len} positions of {self.hidden_size}")
        return self

    @property
    def prefix_len(self) -> int:
        if self.puzzle_emb_len == 0:
            return super().prefix_len
        return self.puzzle_emb_len


@dataclass
class InnerCarry:
    z_H: torch.Tensor  # [B, L+P, D] answer state
    z_L: torch.Tensor  # [B, L+P, D] latent reasoning state


@dataclass
class TRMCarry:
    inner_carry: InnerCarry
    steps: torch.Tensor  # [B] int32, ACT steps taken by the current puzzle of each row
    halted: torch.Tensor  # [B] bool; a halted row takes a new puzzle at the next call
    current_data: Batch  # the puzzle each row is working on (rows of older batches until they halt)


class TRMBlock(nn.Module):
    """Post-norm block: token mixing (attention or MLP over positions), then a channel SwiGLU."""

    def __init__(self, config: ACTModelConfig):
        super().__init__()
        self.use_mlp_t = config.mlp_t
        self.norm_eps = config.rms_norm_eps
        # Submodule names `self_attn` / `mlp_t` / `mlp` are fixed by the checkpoint keys.
        if config.mlp_t:
            # Mixes the L+P positions of each channel, so its weights are tied to the sequence length.
            self.mlp_t = SwiGLU(config.seq_len + config.prefix_len, config.expansion)
        else:
            self.self_attn = Attention(config.hidden_size, head_dim=config.hidden_size // config.num_heads,
                                       num_heads=config.num_heads, num_key_value_heads=config.num_heads, causal=False)
        self.mlp = SwiGLU(config.hidden_size, config.expansion)

    def forward(self, h: torch.Tensor, cos_sin: Optional[CosSin]) -> torch.Tensor:  # h: [B, L+P, D]
        if self.use_mlp_t:
            h = h.transpose(1, 2)  # [B, D, L+P]
            h = rms_norm(h + self.mlp_t(h), self.norm_eps)  # normalised over positions, as the reference does
            h = h.transpose(1, 2)  # [B, L+P, D]
        else:
            h = rms_norm(h + self.self_attn(h, cos_sin), self.norm_eps)
        return rms_norm(h + self.mlp(h), self.norm_eps)


class ReasoningModule(nn.Module):
    """The shared network: add the injection (None: nothing to add), then run every block."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)  # `layers`: checkpoint key name
        self.recompute = False  # set from the config's `recompute` by TRMInner

    def forward(self, h: torch.Tensor, injection: Optional[torch.Tensor], cos_sin: Optional[CosSin]) -> torch.Tensor:
        if injection is not None:
            h = h + injection
        # Only where a backward will follow (the gradient cycle in training): no_grad cycles store nothing.
        recompute = self.recompute and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos_sin, use_reentrant=False)
            else:
                h = layer(h, cos_sin)
        return h


class TRMInner(nn.Module):
    """One ACT step: embed the puzzle, recurse H_cycles times, read out logits and Q-values.

    Variants override only what differs: `build_levels` / `register_start_states` (their networks and start
    states, built at the same point of the RNG draw order), `empty_carry` / `reset_carry` (their carry),
    `recurse` or `h_cycle` (the recursion) and `answer_state` (what the heads read). Embedding, heads and the
    ACT wrapper stay shared.
    """

    def __init__(self, config: TRMConfig):
        super().__init__()
        self.config = config
        D, P = config.hidden_size, config.prefix_len
        self.puzzle_emb_len = P
        self.embed_scale = math.sqrt(D)
        embed_init_std = 1.0 / self.embed_scale

        # Construction order = RNG draw order of the reference (same init for the same seed); the attribute
        # names are the checkpoint keys.
        self.embed_tokens = CastedEmbedding(config.vocab_size, D, init_std=embed_init_std, cast_to=config.dtype)
        self.lm_head = CastedLinear(D, config.vocab_size, bias=False)
        self.q_head = CastedLinear(D, 2, bias=True)  # (q_halt, q_continue), read at position 0
        if config.puzzle_emb_ndim > 0:
            # Zero init: an unseen puzzle starts from "no information" (no RNG draw).
            self.puzzle_emb = CastedSparseEmbedding(config.num_puzzle_identifiers, config.puzzle_emb_ndim,
                                                    batch_size=config.batch_size, init_std=0, cast_to=config.dtype)
        if config.pos_encodings == "rope":
            self.rotary_emb = RotaryEmbedding(D // config.num_heads, max_position_embeddings=config.seq_len + P,
                                              base=config.rope_theta)
        elif config.pos_encodings == "learned":
            self.embed_pos = CastedEmbedding(config.seq_len + P, D, init_std=embed_init_std, cast_to=config.dtype)

        self.build_levels(config)
        for module in self.modules():  # every variant's levels are ReasoningModules of Attention / SwiGLU blocks
            if isinstance(module, ReasoningModule):
                module.recompute = config.recompute
            if isinstance(module, (Attention, SwiGLU)):
                # Not under recompute: measured on an H200, torch.compile does not recompute through the kernels
                # inside checkpointed blocks (Maze at batch 768: 88.1 GiB peak with them, 28.4 without).
                module.fused_kernels = config.fused_kernels and not config.recompute
        self.register_start_states(config)

        # Q-head starts near "never halt" (sigmoid(-5) ≈ 0.007) so halting is learned from a neutral start.
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5)

    def build_levels(self, config: TRMConfig) -> None:
        self.L_level = ReasoningModule([TRMBlock(config) for _ in range(config.L_layers)])

    def register_start_state(self, name: str) -> None:
        """A start state of every new puzzle: a fixed random vector, saved but never trained."""
        D = self.config.hidden_size
        self.register_buffer(name, trunc_normal_init_(torch.empty(D, dtype=self.config.dtype), std=1))

    def register_start_states(self, config: TRMConfig) -> None:
        self.register_start_state("H_init")
        self.register_start_state("L_init")

    # --- carry -------------------------------------------------------------------------------------------
    def zero_state(self, batch_size: int, device=None, slots: Tuple[int, ...] = ()) -> torch.Tensor:
        """[*slots, B, L+P, D] zeros: a state of a fresh carry. Its contents are unused: every row of a fresh
        carry is halted, so it is reset before the first step."""
        shape = (*slots, batch_size, self.config.seq_len + self.puzzle_emb_len, self.config.hidden_size)
        return torch.zeros(shape, dtype=self.config.dtype, device=device)

    @staticmethod
    def restart(reset: torch.Tensor, start: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """`state` [B, L+P, D] with the rows where `reset` [B] is set replaced by the start state `start` [D]."""
        return torch.where(reset.view(-1, 1, 1), start, state)

    def empty_carry(self, batch_size: int, device=None) -> InnerCarry:
        return InnerCarry(z_H=self.zero_state(batch_size, device), z_L=self.zero_state(batch_size, device))

    def reset_carry(self, reset: torch.Tensor, carry: InnerCarry) -> InnerCarry:
        return InnerCarry(z_H=self.restart(reset, self.H_init, carry.z_H),
                          z_L=self.restart(reset, self.L_init, carry.z_L))

    # --- forward -----------------------------------------------------------------------------------------
    def input_embeddings(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor) -> torch.Tensor:
        D = self.config.hidden_size
        x = self.embed_tokens(inputs.to(torch.int32))  # [B, L, D]

        if self.config.puzzle_emb_ndim > 0:
            p = self.puzzle_emb(puzzle_identifiers)  # [B, ndim]
            pad = self.puzzle_emb_len * D - p.shape[-1]
            if pad > 0:
                p = F.pad(p, (0, pad))  # [B, P*D]: the embedding fills the first positions, zeros after
            x = torch.cat((p.view(-1, self.puzzle_emb_len, D), x), dim=-2)  # [B, L+P, D]

        if self.config.pos_encodings == "learned":
            x = 0.707106781 * (x + self.embed_pos.embedding_weight.to(self.config.dtype))  # 1/sqrt(2) keeps the variance

        return self.embed_scale * x

    def h_cycle(self, carry: InnerCarry, x: torch.Tensor, cos_sin: Optional[CosSin]) -> InnerCarry:
        """L_cycles updates of the latent from (answer + input), then one update of the answer from the latent."""
        z_H, z_L = carry.z_H, carry.z_L
        for _ in range(self.config.L_cycles):
            z_L = self.L_level(z_L, z_H + x, cos_sin)
        z_H = self.L_level(z_H, z_L, cos_sin)
        return InnerCarry(z_H=z_H, z_L=z_L)

    def recurse(self, carry: InnerCarry, x: torch.Tensor, cos_sin: Optional[CosSin]) -> InnerCarry:
        # Deep supervision without backprop through time: the first H_cycles-1 cycles only move the state
        # closer to a fixed point; the gradient flows through the last cycle alone.
        with torch.no_grad():
            for _ in range(self.config.H_cycles - 1):
                carry = self.h_cycle(carry, x, cos_sin)
        return self.h_cycle(carry, x, cos_sin)

    def answer_state(self, carry: InnerCarry) -> torch.Tensor:
        return carry.z_H

    def forward(self, carry: InnerCarry, batch: Batch) -> Tuple[InnerCarry, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        cos_sin = self.rotary_emb() if self.config.pos_encodings == "rope" else None
        x = self.input_embeddings(batch["inputs"], batch["puzzle_identifiers"])  # [B, L+P, D]

        carry = self.recurse(carry, x, cos_sin)

        z = self.answer_state(carry)  # [B, L+P, D]
        logits = self.lm_head(z)[:, self.puzzle_emb_len:]  # [B, L, V]
        q_logits = self.q_head(z[:, 0]).to(torch.float32)  # [B, 2], from the first puzzle-embedding position
        new_carry = type(carry)(**{k: v.detach() for k, v in vars(carry).items()})  # next ACT step gets no grad
        return new_carry, logits, (q_logits[..., 0], q_logits[..., 1])


class TinyRecursiveReasoningModel_ACTV1(nn.Module):
    """ACT wrapper. Class name kept: the configs name it `recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1`."""

    inner_class = TRMInner
    config_class = TRMConfig

    def __init__(self, config_dict: dict):
        super().__init__()
        # Opt-in (evaluation): each row halts once its q_halt says halt. Off = the reference, which always runs
        # halt_max_steps steps in eval.
        self.eval_early_exit = False
        self.config = self.config_class(**config_dict)
        self.inner = self.inner_class(self.config)  # `inner`: checkpoint key prefix

    @property
    def puzzle_emb(self) -> CastedSparseEmbedding:
        return self.inner.puzzle_emb

    def initial_carry(self, batch: Batch) -> TRMCarry:
        batch_size, device = batch["inputs"].shape[0], batch["inputs"].device
        return TRMCarry(
            inner_carry=self.inner.empty_carry(batch_size, device=device),
            steps=torch.zeros(batch_size, dtype=torch.int32, device=device),
            halted=torch.ones(batch_size, dtype=torch.bool, device=device),  # all halted: the first call loads the batch
            current_data={k: torch.zeros_like(v) for k, v in batch.items()},
        )

    # --- halting rule (variants override) -----------------------------------------------------------------
    def act_in_training(self) -> bool:
        """Whether the Q-head (and exploration) may halt rows before halt_max_steps in training."""
        return True

    def q_says_halt(self, q_halt_logits: torch.Tensor, q_continue_logits: torch.Tensor) -> torch.Tensor:
        """[B] bool: rows the Q-head sends to halt."""
        if self.config.no_ACT_continue:
            return q_halt_logits > 0
        return q_halt_logits > q_continue_logits

    def trains_continue_head(self, compute_target_q: bool) -> bool:
        """Whether a training step runs the extra inner pass for the q_continue target."""
        return not self.config.no_ACT_continue

    def forward(self, carry: TRMCarry, batch: Batch, generator: Optional[torch.Generator] = None,
                compute_target_q: bool = False) -> Tuple[TRMCarry, Dict[str, torch.Tensor]]:
        """One ACT step for every row. `generator` (on the carry's device) drives the exploration draws in
        training; None uses the device's default generator, as the reference does. `compute_target_q` is the
        transformer baseline's opt-in to the continue target; TRM decides from `no_ACT_continue`."""
        cfg = self.config
        # Halted rows start a new puzzle: fresh state, zero steps, their row of `batch`. Other rows keep
        # their state and their old puzzle (their row of `batch` is not used this step).
        halted = carry.halted
        inner_carry = self.inner.reset_carry(halted, carry.inner_carry)
        steps = torch.where(halted, 0, carry.steps)
        current_data = {k: torch.where(halted.view(-1, *([1] * (v.ndim - 1))), batch[k], v)
                        for k, v in carry.current_data.items()}

        inner_carry, logits, (q_halt_logits, q_continue_logits) = self.inner(inner_carry, current_data)
        outputs = {"logits": logits, "q_halt_logits": q_halt_logits, "q_continue_logits": q_continue_logits}

        with torch.no_grad():
            steps = steps + 1
            is_last_step = steps >= cfg.halt_max_steps
            halted = is_last_step

            # Evaluation runs halt_max_steps steps, so all rows of a batch halt together; with early exit each
            # row halts when its head says so (training's rule, without exploration) and the evaluation loop
            # gives its slot the next puzzle (training/evaluation.py).
            if not self.training and self.eval_early_exit:
                halted = halted | self.q_says_halt(q_halt_logits, q_continue_logits)
            if self.training and cfg.halt_max_steps > 1 and self.act_in_training():
                halted = halted | self.q_says_halt(q_halt_logits, q_continue_logits)

                # Exploration: with probability p a row must run at least m ~ U{2..halt_max_steps} steps.
                # Both draws happen for every row at every training step (same RNG stream as the reference).
                explore = torch.rand(q_halt_logits.shape, dtype=q_halt_logits.dtype, device=q_halt_logits.device,
                                     generator=generator) < cfg.halt_exploration_prob
                min_halt_steps = explore * torch.randint(2, cfg.halt_max_steps + 1, steps.shape, dtype=steps.dtype,
                                                         device=steps.device, generator=generator)
                halted = halted & (steps >= min_halt_steps)

                if self.trains_continue_head(compute_target_q):
                    # Q-learning target for q_continue from one more step on the new state (no replay buffer or
                    # target network: the large batch plays many parallel environments, as in PQN).
                    # The reference unpacks this call into 5 values and crashes (docs/compatibility.md section 12,
                    # item 4).
                    _, _, (next_q_halt, next_q_continue) = self.inner(inner_carry, current_data)
                    outputs["target_q_continue"] = torch.sigmoid(
                        torch.where(is_last_step, next_q_halt, torch.maximum(next_q_halt, next_q_continue)))

        return TRMCarry(inner_carry, steps, halted, current_data), outputs
