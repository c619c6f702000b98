"""A small TRM (hidden 32, float32, damped residual branches) and batches for it, shared by the model tests."""

import torch

from models.losses import IGNORE_LABEL_ID
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1

B, L, V = 4, 16, 5


def small_config(**overrides):
    cfg = dict(batch_size=B, seq_len=L, vocab_size=V, num_puzzle_identifiers=3, puzzle_emb_ndim=32, puzzle_emb_len=2,
               H_cycles=2, L_cycles=2, H_layers=0, L_layers=1, hidden_size=32, expansion=2, num_heads=2,
               pos_encodings="rope", halt_max_steps=4, halt_exploration_prob=0.0, forward_dtype="float32",
               causal=False)  # `causal` is injected by pretrain and must be ignored
    cfg.update(overrides)
    return cfg


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = TinyRecursiveReasoningModel_ACTV1(small_config(**overrides))
    # Damp the residual branches so the recursion is contractive (docs/compatibility.md section 13).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.2)
    return model


def make_batch(seed=1, batch_size=B):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1, V, (batch_size, L), generator=g, dtype=torch.int32)
    labels = torch.randint(1, V, (batch_size, L), generator=g, dtype=torch.int32)
    labels[0, :3] = IGNORE_LABEL_ID
    ids = torch.randint(0, 3, (batch_size,), generator=g, dtype=torch.int32)
    return {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids}
