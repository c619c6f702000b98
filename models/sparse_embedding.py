"""Per-puzzle embedding table trained sparsely: only the rows of the current batch get gradients and updates.

The table is a persistent buffer (not a parameter), so AdamATan2, EMA and the gradient all-reduce never touch
it; `CastedSparseEmbeddingSignSGD_Distributed` updates the touched rows with sign-SGD instead.
"""

import torch
from torch import nn
from torch.optim import Optimizer

from models.common import trunc_normal_init_
from utils import distributed


class CastedSparseEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, batch_size: int, init_std: float, cast_to: torch.dtype):
        super().__init__()
        self.cast_to = cast_to
        # The table itself: saved in checkpoints as `puzzle_emb.weights`.
        self.register_buffer("weights", trunc_normal_init_(torch.empty(num_embeddings, embedding_dim), std=init_std))
        # Per-batch copy of the looked-up rows; its .grad is what the sign-SGD optimizer reads. Not saved.
        self.register_buffer("local_weights", torch.zeros(batch_size, embedding_dim, requires_grad=True), persistent=False)
        self.register_buffer("local_ids", torch.zeros(batch_size, dtype=torch.int32), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.weights[ids].to(self.cast_to)  # [B, ndim]
        # Training: route the rows through the gradient-carrying local buffer.
        with torch.no_grad():
            self.local_weights.copy_(self.weights[ids])
            self.local_ids.copy_(ids)
        return self.local_weights.to(self.cast_to)  # [B, ndim]

    def _apply(self, fn, *args, **kwargs):
        # Module.to()/.cuda() replace buffers by fn(buffer), which for a grad-requiring tensor is a non-leaf
        # that never receives .grad; make `local_weights` a leaf again after every such move.
        super()._apply(fn, *args, **kwargs)
        self.local_weights = self.local_weights.detach().requires_grad_(True)
        return self


class CastedSparseEmbeddingSignSGD_Distributed(Optimizer):
    """Sign-SGD with decoupled weight decay on the rows of the puzzle table that the (global) batch touched.

    Built from the three buffers of a CastedSparseEmbedding (`puzzle_emb.buffers()`): the grad-carrying local
    rows, the 1-D local ids and the 2-D table. Stateless. With world_size > 1 (and an initialised process
    group) the local grads and ids of all ranks are all-gathered first, so every rank applies the same update.
    """

    def __init__(self, params, world_size: int, lr: float = 1e-3, weight_decay: float = 1e-2):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, world_size=world_size))
        self._accumulated = []  # (grad, ids) of earlier micro-batches of this step

    @staticmethod
    def _group_tensors(group):
        local_weights = local_ids = weights = None
        if len(group["params"]) != 3:
            raise ValueError("the sparse embedding group must hold exactly: local weights, local ids, table")
        for p in group["params"]:
            if p.requires_grad:
                local_weights = p
            elif p.ndim == 1:
                local_ids = p
            elif p.ndim == 2:
                weights = p
            else:
                raise ValueError(f"unexpected tensor of shape {tuple(p.shape)} in the sparse embedding group")
        if local_weights is None or local_ids is None or weights is None:
            raise ValueError("the sparse embedding group lacks the local rows, the ids or the table")
        return local_weights, local_ids, weights

    @torch.no_grad()
    def accumulate_local_grads(self) -> None:
        """Gradient accumulation: keep this micro-batch's row gradients and ids (the next forward overwrites the
        local buffers); `step` then updates as if all micro-batches had been one batch."""
        for group in self.param_groups:
            local_weights, local_ids, _ = self._group_tensors(group)
            if local_weights.grad is not None:
                self._accumulated.append((local_weights.grad.clone(), local_ids.clone()))
                local_weights.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            local_weights, local_ids, weights = self._group_tensors(group)
            grads = [g for g, _ in self._accumulated]
            ids = [i for _, i in self._accumulated]
            if local_weights.grad is not None:
                grads.append(local_weights.grad)
                ids.append(local_ids)
            if grads:
                _sparse_emb_signsgd_dist(torch.cat(grads), torch.cat(ids), weights, lr=group["lr"],
                                         weight_decay=group["weight_decay"], world_size=group["world_size"])
        self._accumulated = []


def _sparse_emb_signsgd_dist(local_grad: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
                             lr: float, weight_decay: float, world_size: int) -> None:
    N, D = local_grad.shape
    all_grad, all_ids = local_grad, local_ids  # [N, D], [N]
    if world_size > 1:  # every rank's rows: [world_size * N, D], [world_size * N]
        all_grad, all_ids = distributed.all_gather_rows(local_grad), distributed.all_gather_rows(local_ids)

    # Sum the gradients of rows that share an id (a puzzle can appear several times in a batch).
    grad_ids, inv = all_ids.unique(return_inverse=True)
    grad = torch.zeros(grad_ids.shape[0], D, dtype=all_grad.dtype, device=all_grad.device)
    grad.scatter_add_(0, inv.unsqueeze(-1).expand(-1, D), all_grad)

    # Update only the touched rows: w <- w·(1 - lr·wd) - lr·sign(g).
    p = weights[grad_ids]
    p.mul_(1.0 - lr * weight_decay).add_(torch.sign(grad), alpha=-lr)
    weights[grad_ids] = p
