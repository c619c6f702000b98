"""Worker for tests/test_arc_evaluator.py, run under torchrun on CPU: each of the W gloo ranks feeds the r-th
contiguous share of the saved rows to an ARC evaluator; rank 0 writes the metrics to `<out_dir>/result.json`
(and the evaluator its submission.json there).

    python -m torch.distributed.run --nproc-per-node 2 ... tests/arc_dist_worker.py DATA_PATH ROWS_PT OUT_DIR
"""

import json
import math
import os
import sys

import torch
import torch.distributed as dist

from dataset.common import PuzzleDatasetMetadata
from evaluators.arc import ARC


def main(data_path: str, rows_path: str, out_dir: str) -> None:
    dist.init_process_group(backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # The training loop passes a separate gloo group for CPU object gathers; do the same.
    cpu_group = dist.new_group(backend="gloo")

    with open(os.path.join(data_path, "test", "dataset.json")) as f:
        metadata = PuzzleDatasetMetadata(**json.load(f))
    rows = torch.load(rows_path, weights_only=True)
    per_rank = math.ceil(len(rows["puzzle_identifiers"]) / world_size)
    shard = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in rows.items()}

    evaluator = ARC(data_path, metadata)
    evaluator.begin_eval()
    evaluator.update_batch(
        {k: shard[k] for k in ("inputs", "puzzle_identifiers")}, {k: shard[k] for k in ("preds", "q_halt_logits")}
    )
    metrics = evaluator.result(out_dir, rank, world_size, group=cpu_group)

    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(metrics, f)
    elif metrics is not None:
        raise AssertionError(f"rank {rank} returned {metrics}, expected None")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
