"""The evaluation loop shared by pretrain.py and scripts/run_eval_only.py (docs/compatibility.md section 10.1):
every test batch runs the ACT loop until all rows halt (halt_max_steps calls in eval mode), metrics are summed per
set over batches and ranks and divided by the count of scored rows, chosen outputs are saved per rank, and each
evaluator (e.g. ARC voting) gets the batch and produces its own metrics."""

import itertools
import os
from typing import Dict, List, Optional, Sequence

import torch
import tqdm

from dataset.common import PuzzleDatasetMetadata
from models.losses import IGNORE_LABEL_ID
from training.checkpoint import atomic_torch_save, unwrap
from utils import distributed

BATCH_KEYS = ("inputs", "labels", "puzzle_identifiers")


def evaluate(model: torch.nn.Module, loader, metadata: PuzzleDatasetMetadata, evaluators: Sequence, *,
             dist_info: distributed.DistInfo, step: int, save_dir: Optional[str], save_outputs: Sequence[str] = (),
             early_exit: bool = False, progress: bool = False,
             counts_out: Optional[Dict[str, Dict[str, int]]] = None) -> Optional[Dict[str, Dict[str, float]]]:
    """Returns {set: {metric: value}, <evaluator metrics>} on rank 0, None elsewhere. On rank 0, `counts_out`
    (if given) receives per set the rows scored ("count") and their labelled tokens ("tokens")."""
    device = dist_info.device
    model.eval()
    return_keys = set(save_outputs)
    for evaluator in evaluators:
        evaluator.begin_eval()
        return_keys |= set(evaluator.required_outputs)
    # Opt-in: the ACT model halts a whole eval batch once every row's halting head says halt (the reference
    # always runs halt_max_steps); the `steps` metric then reports the mean ACT steps used.
    unwrap(model).model.eval_early_exit = early_exit
    max_act_steps = unwrap(model).model.config.halt_max_steps

    set_ids = {name: i for i, name in enumerate(metadata.sets)}
    metric_keys: List[str] = []
    metric_sums: Optional[torch.Tensor] = None  # [sets, metrics], sums over this rank's batches
    saved: Dict[str, List[torch.Tensor]] = {k: [] for k in save_outputs}

    bar = tqdm.tqdm(desc="eval", unit="batch", disable=not (progress and dist_info.is_main), leave=False)
    with torch.inference_mode():
        for set_name, batch, _global_batch_size in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            carry = model.initial_carry(batch)
            for act_step in itertools.count(1):
                carry, _loss, metrics, outputs, all_halted = model(return_keys=return_keys, carry=carry, batch=batch)
                # Without early exit no row halts before halt_max_steps, so the loop reads `all_halted` (a sync
                # that idles the GPU while the next step is queued) only from then on.
                if (early_exit or act_step >= max_act_steps) and all_halted:
                    break

            for key in save_outputs:
                source = batch if key in BATCH_KEYS else outputs
                if key in source:
                    saved[key].append(source[key].cpu())
            if evaluators:
                batch_cpu = {k: v.cpu() for k, v in batch.items()}
                outputs_cpu = {k: v.cpu() for k, v in outputs.items()}
                for evaluator in evaluators:
                    evaluator.update_batch(batch_cpu, outputs_cpu)

            if metric_sums is None:
                metric_keys = sorted(metrics)
                metric_sums = torch.zeros(len(set_ids), len(metric_keys), dtype=torch.float32, device=device)
                token_counts = torch.zeros(len(set_ids), dtype=torch.int64, device=device)
            metric_sums[set_ids[set_name]] += torch.stack([metrics[k].float() for k in metric_keys])
            token_counts[set_ids[set_name]] += (batch["labels"] != IGNORE_LABEL_ID).sum()
            bar.update()
    bar.close()

    if save_dir is not None and any(saved.values()):
        atomic_torch_save({k: torch.cat(v) for k, v in saved.items() if v},
                          os.path.join(save_dir, f"step_{step}_all_preds.{dist_info.rank}"))

    result = None
    if metric_sums is not None:
        distributed.reduce_sum_to_main(metric_sums)
        distributed.reduce_sum_to_main(token_counts)
        if dist_info.is_main:
            sums = metric_sums.cpu().numpy()
            result = {}
            for set_name, set_id in set_ids.items():
                values = dict(zip(metric_keys, sums[set_id].tolist()))
                count = values.pop("count")
                result[set_name] = {k: v / max(count, 1) for k, v in values.items()}
                if counts_out is not None:
                    counts_out[set_name] = {"count": int(count), "tokens": int(token_counts[set_id])}

    for evaluator in evaluators:
        evaluator_dir = None
        if save_dir is not None:
            evaluator_dir = os.path.join(save_dir, f"evaluator_{evaluator.__class__.__name__}_step_{step}")
            os.makedirs(evaluator_dir, exist_ok=True)
        evaluator_metrics = evaluator.result(evaluator_dir, rank=dist_info.rank, world_size=dist_info.world_size,
                                             group=dist_info.cpu_group)
        if dist_info.is_main and evaluator_metrics:
            result = result if result is not None else {}
            result.update(evaluator_metrics)
    return result
