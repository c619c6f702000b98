"""Device parity of `arch.recompute`: the recomputing and the plain path on CUDA in bf16, one train step each from
the same weights; prints the max abs difference of loss, logits, gradients, AdamATan2 state and weights (JSON).

    python scripts/recompute_parity.py   # docs/performance.md records its result
"""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from tests.trm_small import make_batch
from tests.test_perf_paths import loss_head, one_train_step
out = {}
for name, variant in (("attention", {}), ("mlp_t", {"mlp_t": True, "pos_encodings": "none"})):
    with torch.device("cuda"):
        plain = loss_head(forward_dtype="bfloat16", **variant)
        rec = loss_head(recompute=True, forward_dtype="bfloat16", **variant)
    rec.load_state_dict(plain.state_dict())
    batch = {k: v.cuda() for k, v in make_batch().items()}
    a, b = one_train_step(plain, batch), one_train_step(rec, batch)
    d = lambda x, y: float((x.float() - y.float()).abs().max())
    out[name] = {"loss": d(a[1], b[1]), "logits": d(a[2], b[2]),
                 "grads": max(d(a[3][k], b[3][k]) for k in a[3]),
                 "opt_state": max(d(a[4][i][k], b[4][i][k]) for i in a[4] for k in a[4][i] if torch.is_tensor(a[4][i][k])),
                 "weights_after_step": max(d(a[5][k], b[5][k]) for k in a[5])}
print(json.dumps(out))
