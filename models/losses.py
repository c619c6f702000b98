"""Loss head of the ACT models: token cross-entropy (stablemax or softmax), the halting Q-losses and the
unnormalised metric sums that training and evaluation reduce."""

from typing import Dict, Literal, Optional, Sequence, Tuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

from dataset.common import IGNORE_LABEL_ID  # re-exported: the loss head's ignore label
from utils.errors import ConfigError


def _stablemax_s(x: torch.Tensor, epsilon: float = 1e-30) -> torch.Tensor:
    # Grows linearly instead of exponentially: no overflow, and no "softmax collapse" late in training.
    return torch.where(x < 0, 1 / (1 - x + epsilon), x + 1)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    s_x = _stablemax_s(x)
    return torch.log(s_x / torch.sum(s_x, dim=dim, keepdim=True))


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_LABEL_ID,
                            valid_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-position -log stablemax(logits)[label] in float64; 0 where the label is ignored. [B, L] from [B, L, V]."""
    logprobs = log_stablemax(logits.to(torch.float64), dim=-1)
    if valid_mask is None:
        valid_mask = labels != ignore_index
    safe_labels = torch.where(valid_mask, labels, 0).to(torch.long)  # any in-range index; masked out below
    picked = torch.gather(logprobs, index=safe_labels.unsqueeze(-1), dim=-1).squeeze(-1)
    return -torch.where(valid_mask, picked, 0)


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_LABEL_ID,
                          valid_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-position softmax cross-entropy in float32; 0 where the label is ignored. [B, L] from [B, L, V].

    Accepts `valid_mask` like stablemax (the reference's version does not, and crashes under the loss head:
    docs/compatibility.md section 12, item 5)."""
    labels = labels.to(torch.long)
    if valid_mask is not None:
        labels = torch.where(valid_mask, labels, ignore_index)
    # reshape, not view: the logits are a slice past the puzzle prefix, hence not contiguous.
    return F.cross_entropy(logits.to(torch.float32).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="none").view(labels.shape)


LossType = Literal["stablemax_cross_entropy", "softmax_cross_entropy"]  # the config checks arch.loss.loss_type with it
LOSS_FUNCTIONS = {"stablemax_cross_entropy": stablemax_cross_entropy, "softmax_cross_entropy": softmax_cross_entropy}
assert set(get_args(LossType)) == set(LOSS_FUNCTIONS)


# Per-row [B] values of lm_loss and q_halt_loss, returned as outputs when return_keys asks for the first.
ROW_LOSS_KEYS = ("lm_loss_rows", "q_halt_loss_rows")


class ACTLossHead(nn.Module):
    """Wraps an ACT model (attribute `model`, part of the checkpoint keys) and turns one ACT step into losses.

    Per row b with n_b supervised tokens: lm_loss = Σ_b mean_t CE_bt (over all rows, halted or not);
    q_halt learns to predict "the whole sequence is already correct". Metrics are sums over halted rows with
    at least one label; the trainer normalises them.
    """

    # The constructor's settings (arch.loss.<key>), as `python pretrain.py --help` lists them.
    CONFIG_HELP = {"loss_type": f"token cross entropy: {' or '.join(LOSS_FUNCTIONS)}"}

    def __init__(self, model: nn.Module, loss_type: LossType):
        super().__init__()
        if loss_type not in LOSS_FUNCTIONS:
            raise ConfigError(f"unknown loss_type {loss_type!r}; expected one of {sorted(LOSS_FUNCTIONS)}")
        self.model = model
        self.loss_fn = LOSS_FUNCTIONS[loss_type]

    def initial_carry(self, *args, **kwargs):
        return self.model.initial_carry(*args, **kwargs)

    def forward(self, return_keys: Sequence[str], **model_kwargs) -> Tuple[object, torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor], torch.Tensor]:
        """Returns (new carry, total loss, metric sums, detached outputs named in return_keys, all rows halted)."""
        new_carry, outputs = self.model(**model_kwargs)
        labels = new_carry.current_data["labels"]  # [B, L]; the data the rows actually worked on

        with torch.no_grad():
            outputs["preds"] = torch.argmax(outputs["logits"], dim=-1)  # [B, L] int64

            mask = labels != IGNORE_LABEL_ID
            loss_counts = mask.sum(-1)  # [B]
            loss_divisor = loss_counts.clamp_min(1).unsqueeze(-1)  # [B, 1]; rows without labels divide by 1

            is_correct = mask & (outputs["preds"] == labels)
            seq_is_correct = is_correct.sum(-1) == loss_counts  # also true for rows without labels (padding)

            valid_metrics = new_carry.halted & (loss_counts > 0)
            metrics = {
                "count": valid_metrics.sum(),
                "accuracy": torch.where(valid_metrics, (is_correct.to(torch.float32) / loss_divisor).sum(-1), 0).sum(),
                "exact_accuracy": (valid_metrics & seq_is_correct).sum(),
                "q_halt_accuracy": (valid_metrics & ((outputs["q_halt_logits"] >= 0) == seq_is_correct)).sum(),
                "steps": torch.where(valid_metrics, new_carry.steps, 0).sum(),
            }

        row_token_losses = self.loss_fn(outputs["logits"], labels, ignore_index=IGNORE_LABEL_ID, valid_mask=mask) / loss_divisor
        lm_loss = row_token_losses.sum()
        q_halt_target = seq_is_correct.to(outputs["q_halt_logits"].dtype)
        q_halt_loss = F.binary_cross_entropy_with_logits(outputs["q_halt_logits"], q_halt_target, reduction="sum")
        if ROW_LOSS_KEYS[0] in return_keys:  # evaluation with early exit scores each row at its own halting step
            with torch.no_grad():
                outputs[ROW_LOSS_KEYS[0]] = row_token_losses.sum(-1)
                outputs[ROW_LOSS_KEYS[1]] = F.binary_cross_entropy_with_logits(
                    outputs["q_halt_logits"], q_halt_target, reduction="none")
        metrics["lm_loss"] = lm_loss.detach()
        metrics["q_halt_loss"] = q_halt_loss.detach()

        q_continue_loss = 0
        if "target_q_continue" in outputs:  # only with no_ACT_continue=False, in training
            q_continue_loss = F.binary_cross_entropy_with_logits(outputs["q_continue_logits"], outputs["target_q_continue"],
                                                                 reduction="sum")
            metrics["q_continue_loss"] = q_continue_loss.detach()

        detached_outputs = {k: outputs[k].detach() for k in return_keys if k in outputs}
        total_loss = lm_loss + 0.5 * (q_halt_loss + q_continue_loss)
        return new_carry, total_loss, metrics, detached_outputs, new_carry.halted.all()
