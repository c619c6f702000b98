"""Losses of the ACT loss head on CPU: stablemax and softmax cross entropy against hand computations, the head's
losses and metric sums, and the refusal of an unknown loss type."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import IGNORE_LABEL_ID, ACTLossHead, softmax_cross_entropy, stablemax_cross_entropy
from tests.trm_small import make_model, make_batch, V


def test_stablemax_cross_entropy_matches_float64_hand_computation():
    logits = torch.tensor([[[2.0, -1.0, 0.5, -3.0], [0.0, 0.0, -0.25, 4.0], [1.0, 2.0, 3.0, -1.0]]])  # [1, 3, 4]
    labels = torch.tensor([[0, 3, IGNORE_LABEL_ID]])
    loss = stablemax_cross_entropy(logits, labels)
    assert loss.dtype == torch.float64 and loss.shape == (1, 3)

    def s(x):  # x+1 for x >= 0, 1/(1-x) below (the 1e-30 epsilon vanishes in float64 here)
        return x + 1 if x >= 0 else 1 / (1 - x)

    for t, y in enumerate(labels[0].tolist()):
        if y == IGNORE_LABEL_ID:
            assert loss[0, t].item() == 0.0
            continue
        row = [s(float(x)) for x in logits[0, t]]
        expected = -math.log(row[y] / sum(row))
        assert loss[0, t].item() == pytest.approx(expected, rel=1e-12)

    # An explicit valid_mask wins over ignore_index.
    masked = stablemax_cross_entropy(logits, labels, valid_mask=torch.tensor([[True, False, False]]))
    assert masked[0, 0] == loss[0, 0] and masked[0, 1] == 0 and masked[0, 2] == 0


def test_softmax_cross_entropy_accepts_valid_mask():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, V, generator=g)
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[1, 4] = IGNORE_LABEL_ID
    mask = labels != IGNORE_LABEL_ID
    expected = F.cross_entropy(logits.view(-1, V), labels.clamp_min(0).view(-1), reduction="none").view(2, 6) * mask
    torch.testing.assert_close(softmax_cross_entropy(logits, labels), expected)
    torch.testing.assert_close(softmax_cross_entropy(logits, labels, valid_mask=mask), expected)
    narrower = mask.clone()
    narrower[0, 0] = False
    out = softmax_cross_entropy(logits, labels, valid_mask=narrower)
    assert out[0, 0] == 0 and out[0, 1] == expected[0, 1]


@pytest.mark.parametrize("loss_type", ["stablemax_cross_entropy", "softmax_cross_entropy"])
def test_loss_head_metrics_and_losses(loss_type):
    head = ACTLossHead(make_model(), loss_type)
    batch = make_batch()
    batch["labels"][2] = IGNORE_LABEL_ID  # a row without labels: counts nowhere, but its q target is "correct"
    head.eval()
    carry = head.initial_carry(batch)
    for _ in range(4):
        carry, loss, metrics, outputs, all_halted = head(return_keys=["logits", "preds", "q_halt_logits"], carry=carry, batch=batch)
    assert bool(all_halted)
    assert set(outputs) == {"logits", "preds", "q_halt_logits"} and not outputs["logits"].requires_grad

    labels, preds, q_halt = batch["labels"], outputs["preds"], outputs["q_halt_logits"]
    mask = labels != IGNORE_LABEL_ID
    n = mask.sum(-1)
    correct = mask & (preds == labels)
    seq_correct = correct.sum(-1) == n
    valid = n > 0  # every row halted at the last eval step
    ce = stablemax_cross_entropy if loss_type == "stablemax_cross_entropy" else softmax_cross_entropy
    lm_loss = (ce(outputs["logits"], labels) / n.clamp_min(1).unsqueeze(-1)).sum()
    q_halt_loss = F.binary_cross_entropy_with_logits(q_halt, seq_correct.float(), reduction="sum")

    assert metrics["count"].item() == valid.sum().item() == 3
    assert metrics["accuracy"].item() == pytest.approx((correct.sum(-1) / n.clamp_min(1))[valid].sum().item(), rel=1e-6)
    assert metrics["exact_accuracy"].item() == (valid & seq_correct).sum().item()
    assert metrics["q_halt_accuracy"].item() == (valid & ((q_halt >= 0) == seq_correct)).sum().item()
    assert metrics["steps"].item() == 4 * 3
    assert metrics["lm_loss"].item() == pytest.approx(lm_loss.item(), rel=1e-6)
    assert metrics["q_halt_loss"].item() == pytest.approx(q_halt_loss.item(), rel=1e-6)
    assert loss.item() == pytest.approx(lm_loss.item() + 0.5 * q_halt_loss.item(), rel=1e-6)
    assert "q_continue_loss" not in metrics


def test_unknown_loss_type_fails():
    with pytest.raises(ValueError):
        ACTLossHead(make_model(), "cross_entropy")
