"""The evaluation loop shared by pretrain.py and scripts/run_eval_only.py (docs/compatibility.md section 10.1):
every test batch runs the ACT loop until all rows halt (halt_max_steps calls in eval mode), metrics are summed per
set over batches and ranks and divided by the count of scored rows, chosen outputs are saved per rank, and each
evaluator (e.g. ARC voting) gets the batch and produces its own metrics.

With early exit (opt-in) rows instead stream through the batch's slots: each leaves at the step its halting head
says halt and the next puzzle takes its slot (`_rows_streamed`). Metrics are then those of each row's own last
step, with lm_loss and q_halt_loss summed over the scored rows only."""

import itertools
import os
from typing import Dict, List, Optional, Sequence

import torch
import tqdm

from dataset.common import PuzzleDatasetMetadata
from models.losses import IGNORE_LABEL_ID, ROW_LOSS_KEYS
from puzzle_dataset import local_real_rows
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
    # Opt-in: each row halts when its halting head says so and takes its prediction from that step (the
    # reference always runs halt_max_steps); the `steps` metric then reports the mean ACT steps used.
    unwrap(model).model.eval_early_exit = early_exit

    set_ids = {name: i for i, name in enumerate(metadata.sets)}
    metric_keys: List[str] = []
    metric_sums: Optional[torch.Tensor] = None  # [sets, metrics], sums over this rank's batches
    saved: Dict[str, List[torch.Tensor]] = {k: [] for k in save_outputs}
    # What leaves the GPU: the batch keys and outputs that are saved or that an evaluator reads.
    cpu_batch_keys = set(BATCH_KEYS) if evaluators else set(save_outputs) & set(BATCH_KEYS)
    cpu_output_keys = return_keys - set(BATCH_KEYS) if evaluators else set(save_outputs) - set(BATCH_KEYS)

    bar = tqdm.tqdm(desc="eval", unit="batch", disable=not (progress and dist_info.is_main), leave=False)
    run = _rows_streamed if early_exit else _rows_batched
    with torch.inference_mode():
        for set_name, batch_cpu, outputs_cpu, metrics, batches_done in run(
                model, loader, metadata, device, dist_info.rank, return_keys, cpu_batch_keys, cpu_output_keys):
            for key in save_outputs:
                source = batch_cpu if key in BATCH_KEYS else outputs_cpu
                if key in source:
                    saved[key].append(source[key])
            for evaluator in evaluators:
                evaluator.update_batch(batch_cpu, outputs_cpu)

            if metric_sums is None:
                metric_keys = sorted(k for k in metrics if k != "tokens")
                metric_sums = torch.zeros(len(set_ids), len(metric_keys), dtype=torch.float32, device=device)
                token_counts = torch.zeros(len(set_ids), dtype=torch.int64, device=device)
            metric_sums[set_ids[set_name]] += torch.stack([metrics[k].float() for k in metric_keys])
            token_counts[set_ids[set_name]] += metrics["tokens"]
            bar.update(batches_done)
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


def _to_cpu(tensors: Dict[str, torch.Tensor], keys, non_blocking: bool = False) -> Dict[str, torch.Tensor]:
    return {k: v.to("cpu", non_blocking=non_blocking) for k, v in tensors.items() if k in keys}


def _rows_batched(model, loader, metadata, device, rank, return_keys, cpu_batch_keys, cpu_output_keys):
    """The reference's loop: each loader batch runs the ACT loop until all its rows halt (halt_max_steps calls).
    Yields (set, batch rows on CPU, output rows on CPU, metric sums on the device, loader batches consumed)."""
    max_act_steps = unwrap(model).model.config.halt_max_steps
    for set_name, batch, _global_rows in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        carry = model.initial_carry(batch)
        for act_step in itertools.count(1):
            carry, _loss, metrics, outputs, all_halted = model(return_keys=return_keys, carry=carry, batch=batch)
            # No row halts before halt_max_steps here, so the loop reads `all_halted` (a sync that idles the GPU
            # while the next step is queued) only from then on.
            if act_step >= max_act_steps and all_halted:
                break
        metrics = {**metrics, "tokens": (batch["labels"] != IGNORE_LABEL_ID).sum()}
        yield set_name, _to_cpu(batch, cpu_batch_keys), _to_cpu(outputs, cpu_output_keys), metrics, 1


def _rows_streamed(model, loader, metadata, device, rank, return_keys, cpu_batch_keys, cpu_output_keys):
    """Early exit with continuous batching: the batch's B rows are slots; a row that halts leaves with the
    outputs of its halting step and its slot takes the next puzzle of the set at the next ACT step, so a batch
    never waits for its slowest row. The loader's padding rows are never run; each set drains before the next
    starts (metrics are kept per set). Yields what `_rows_batched` yields, once per ACT step in which rows
    finished; rows come in the order they finish.

    Per step the loop reads which rows halted (one small device-to-host copy). The finished rows are copied
    out before the next step is queued, so the host work on them overlaps that step on the GPU."""
    return_keys = return_keys | set(ROW_LOSS_KEYS)
    loader = iter(loader)
    lookahead = next(loader, None)
    while lookahead is not None:
        set_name, pending = lookahead[0], []  # pending: CPU row blocks of this set not yet in a slot
        slots = lookahead[1]["inputs"].shape[0]
        filler = {k: v[:1].clone() for k, v in lookahead[1].items()}  # what idle slots hold: a padding row
        filler["inputs"].fill_(metadata.pad_id)
        filler["labels"].fill_(IGNORE_LABEL_ID)
        filler["puzzle_identifiers"].fill_(metadata.blank_identifier_id)
        filler = {k: v.to(device).expand(slots, *v.shape[1:]).contiguous() for k, v in filler.items()}

        def pull() -> int:  # move loader batches of this set into `pending`; returns batches consumed
            nonlocal lookahead
            consumed = 0
            while lookahead is not None and lookahead[0] == set_name and sum(len(p["labels"]) for p in pending) < slots:
                _, batch, global_rows = lookahead
                real = local_real_rows(global_rows, rank, slots)
                if real:
                    pending.append({k: v[:real] for k, v in batch.items()})
                lookahead, consumed = next(loader, None), consumed + 1
            return consumed

        active = torch.zeros(slots, dtype=torch.bool)  # slots working on a real puzzle (host side)
        carry = model.initial_carry(filler)  # every slot halted: the first step loads them
        halted = torch.ones(slots, dtype=torch.bool)
        finished_rows, consumed = None, 0
        while True:
            consumed += pull()
            # Rows that halted in the last step leave; their device copies are taken before the next step.
            done = (halted & active).nonzero().squeeze(-1)
            if done.numel():
                index = done.to(device, non_blocking=True)
                rows = {k: v.index_select(0, index) for k, v in carry.current_data.items()}
                outs = {k: v.index_select(0, index) for k, v in outputs.items()}
                step_metrics = {**metrics, "lm_loss": outs[ROW_LOSS_KEYS[0]].sum(),
                                "q_halt_loss": outs[ROW_LOSS_KEYS[1]].sum(),
                                "tokens": (rows["labels"] != IGNORE_LABEL_ID).sum()}
                finished_rows = (_to_cpu(rows, cpu_batch_keys, non_blocking=True),
                                 _to_cpu(outs, cpu_output_keys, non_blocking=True), step_metrics)
                copied = torch.cuda.Event() if index.is_cuda else None
                if copied is not None:
                    copied.record()
            active &= ~halted

            free = halted.nonzero().squeeze(-1)  # halted slots (idle ones included) take new rows
            new_rows = _take(pending, len(free))
            step_batch = filler
            if new_rows is not None:
                taken = free[:len(new_rows["labels"])]
                step_batch = {k: v.index_copy(0, taken.to(device), new_rows[k].to(device, non_blocking=True))
                              for k, v in filler.items()}
                active[taken] = True
            if active.any():
                carry, _loss, metrics, outputs, _ = model(return_keys=return_keys, carry=carry, batch=step_batch)
            if finished_rows is not None:
                if copied is not None:
                    copied.synchronize()
                yield (set_name, *finished_rows, consumed)
                finished_rows, consumed = None, 0
            if not active.any():
                break
            halted = carry.halted.cpu()  # the one sync per step


def _take(pending: List[Dict[str, torch.Tensor]], n: int) -> Optional[Dict[str, torch.Tensor]]:
    """Remove up to n leading rows from the row blocks in `pending`; None when there are none."""
    blocks, have = [], 0
    while pending and have < n:
        block = pending[0]
        k = min(n - have, len(block["labels"]))
        blocks.append({key: v[:k] for key, v in block.items()})
        if k == len(block["labels"]):
            pending.pop(0)
        else:
            pending[0] = {key: v[k:] for key, v in block.items()}
        have += k
    if not blocks:
        return None
    return {key: torch.cat([b[key] for b in blocks]) for key in blocks[0]}
