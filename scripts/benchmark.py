"""Training throughput of the real code path (pretrain.py's model, optimizers and train step) on this machine.

    python scripts/benchmark.py --steps 50 arch=trm arch.L_cycles=6 global_batch_size=768
    python scripts/benchmark.py --dataset data/maze-30x30-hard-1k --no-compile

Prints one JSON line: device, torch version, steps/s, examples/s, compile+warm-up time and peak GPU memory.
Batches come from `--dataset` (its train split, through the project's loader) or are synthetic Sudoku-shaped
ones (`--seq-len`, `--vocab-size`). Results go into docs/performance.md with the date and command."""

import argparse
import itertools
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

import pretrain  # noqa: E402
from dataset.common import PuzzleDatasetMetadata  # noqa: E402
from utils import distributed  # noqa: E402
from utils.config import compose_config  # noqa: E402


def synthetic_batches(metadata: PuzzleDatasetMetadata, batch_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        inputs = torch.randint(1, metadata.vocab_size, (batch_size, metadata.seq_len), generator=gen, dtype=torch.int32)
        labels = torch.randint(2, metadata.vocab_size, (batch_size, metadata.seq_len), generator=gen, dtype=torch.int32)
        ids = torch.zeros(batch_size, dtype=torch.int32)
        yield "all", {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids}, batch_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO_ROOT, "config", "cfg_pretrain.yaml"))
    p.add_argument("--dataset", default=None, help="dataset folder (default: synthetic batches)")
    p.add_argument("--seq-len", type=int, default=81)
    p.add_argument("--vocab-size", type=int, default=11)
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. arch.mlp_t=True global_batch_size=768")
    args = p.parse_args()

    data_path = args.dataset or "synthetic"
    overrides = list(args.overrides) + [f"data_paths=[{data_path}]", "evaluators=[]", "+project_name=benchmark",
                                        "+run_name=benchmark", f"compile={not args.no_compile}"]
    config = compose_config(args.config, overrides)
    dist_info = distributed.setup_distributed(config.device)
    torch.manual_seed(config.seed)

    if args.dataset:
        loader, metadata = pretrain.create_loader(config, "train", [args.dataset], dist_info, epochs_per_iter=10**6)
        batches = iter(loader)
    else:
        metadata = PuzzleDatasetMetadata(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=args.vocab_size,
                                         seq_len=args.seq_len, num_puzzle_identifiers=1, total_groups=10**6,
                                         mean_puzzle_examples=1.0, total_puzzles=10**6, sets=["all"])
        batches = synthetic_batches(metadata, config.global_batch_size, config.seed)
    state = pretrain.create_train_state(config, metadata, dist_info)
    state.total_steps = 10**9  # the schedule position does not change the cost of a step

    def run(n: int) -> float:
        start = time.perf_counter()
        for _set, batch, global_batch_size in itertools.islice(batches, n):
            pretrain.train_batch(config, state, batch, global_batch_size, dist_info)
        if dist_info.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warmup_s = run(args.warmup)
    timed_s = run(args.steps)
    result = {
        "device": torch.cuda.get_device_name() if dist_info.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "compiled": state.compiled, "world_size": dist_info.world_size,
        "global_batch_size": config.global_batch_size, "micro_batch_size": state.micro_batch_size,
        "seq_len": metadata.seq_len, "arch": {k: v for k, v in (config.arch.model_extra or {}).items()},
        "warmup_s": round(warmup_s, 2), "steps": args.steps, "steps_per_s": round(args.steps / timed_s, 3),
        "examples_per_s": round(args.steps * config.global_batch_size / timed_s, 1),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
    if dist_info.is_main:
        print(json.dumps(result))
    distributed.cleanup()


if __name__ == "__main__":
    main()
