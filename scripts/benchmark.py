"""Speed and memory of the real code paths (pretrain.py's model, optimizers and train step; training/evaluation.py's
evaluation loop) on this machine, for one config and batch.

    python scripts/benchmark.py --steps 30 --warmup 8 global_batch_size=768
    python scripts/benchmark.py --seq-len 900 --vocab-size 6 global_batch_size=192 arch.L_cycles=4
    python scripts/benchmark.py --dataset data/maze-30x30-hard-1k --no-compile --eval-batches 0
    python scripts/benchmark.py --profile global_batch_size=768     # + which kernels take the time
    python scripts/benchmark.py --early-exit --eval-halt-bias 5 global_batch_size=768   # streaming's worst case

Prints one JSON object (and writes it to `--json-out`): train ms/step, examples/s, peak training memory and
training/memory.py's estimate of it, compile/warm-up time, evaluation puzzles/s through the full ACT loop and its
peak memory (with `--early-exit`: the mean ACT steps the rows used and the row-steps/s), and achieved TFLOP/s from
the FLOP count derived in docs/performance.md (`model_flops` below).
Batches come from `--dataset` (its train split, through the project's loader) or are synthetic ones of the task's
shape (`--seq-len`, `--vocab-size`); the cost of a step does not depend on the token values. With `--profile`,
after the timed work torch.profiler records `--profile-steps` train steps and, apart, `--profile-eval-batches`
evaluation batches; their top-30 operators and kernels by self time (CUDA time on a GPU, CPU time on a CPU) are
printed and stored as text in `profile_train` and `profile_eval`."""

import argparse
import itertools
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from dataset.common import PuzzleDatasetMetadata  # noqa: E402
from models.layers import swiglu_intermediate_size  # noqa: E402
import pretrain  # noqa: E402
from training.checkpoint import unwrap  # noqa: E402
from training.config import compose_config  # noqa: E402
from training import memory  # noqa: E402
from training.evaluation import evaluate  # noqa: E402
from utils import distributed  # noqa: E402
from utils.atomic import atomic_write_text  # noqa: E402


def synthetic_metadata(seq_len: int, vocab_size: int, num_puzzle_identifiers: int = 1) -> PuzzleDatasetMetadata:
    """A task of this shape with no files behind it (for `synthetic_batches`)."""
    return PuzzleDatasetMetadata(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=vocab_size,
                                 seq_len=seq_len, num_puzzle_identifiers=num_puzzle_identifiers, total_groups=10**6,
                                 mean_puzzle_examples=1.0, total_puzzles=10**6, sets=["all"])


def synthetic_batches(metadata: PuzzleDatasetMetadata, batch_size: int, seed: int):
    """Endless (set, batch, global batch size) triples as the loader yields them, random tokens and puzzle ids."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        inputs = torch.randint(1, metadata.vocab_size, (batch_size, metadata.seq_len), generator=gen, dtype=torch.int32)
        labels = torch.randint(2, metadata.vocab_size, (batch_size, metadata.seq_len), generator=gen, dtype=torch.int32)
        ids = torch.randint(0, metadata.num_puzzle_identifiers, (batch_size,), generator=gen, dtype=torch.int32)
        yield "all", {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids}, batch_size


def model_flops(cfg) -> dict:
    """Matrix-product FLOPs (2 per multiply-add) per example, from a TRMConfig (docs/performance.md derives them).

    One pass of the shared network over S = L + P positions, per layer: attention 2·S·(3D·D + D·D) for the qkv and
    output projections plus 4·S²·D for QKᵀ and AV (or, MLP-T, 6·D·S·I_t for the SwiGLU over positions); then the
    channel SwiGLU 6·S·D·I. An ACT step runs the network H_cycles·(L_cycles + 1) times and lm_head (2·S·D·V)
    once. Training runs every cycle forward and the last cycle (and the head) backward at twice its forward."""
    S, D = cfg.seq_len + cfg.prefix_len, cfg.hidden_size
    inter = swiglu_intermediate_size(D, cfg.expansion)
    if cfg.mlp_t:
        mixer = 6 * D * S * swiglu_intermediate_size(S, cfg.expansion)
    else:
        mixer = 2 * S * 4 * D * D + 4 * S * S * D
    network = cfg.L_layers * (mixer + 6 * S * D * inter)  # one call of the shared network
    head = 2 * S * D * cfg.vocab_size + 2 * D * 2
    act_step_forward = cfg.H_cycles * (cfg.L_cycles + 1) * network + head
    grad_cycle_forward = (cfg.L_cycles + 1) * network + head
    return {"act_step_forward": act_step_forward, "train_step": act_step_forward + 2 * grad_cycle_forward}


def peak_mem_gib(device: torch.device):
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_table(device: torch.device, run) -> str:
    """torch.profiler's table of the 30 operators/kernels with the most self time while `run()` works."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        sync(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=100)  # Triton names are long


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO_ROOT, "config", "cfg_pretrain.yaml"))
    p.add_argument("--dataset", default=None, help="dataset folder (default: synthetic batches)")
    p.add_argument("--seq-len", type=int, default=81)
    p.add_argument("--vocab-size", type=int, default=11)
    p.add_argument("--steps", type=int, default=50, help="timed train steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed train steps first (compilation happens here)")
    p.add_argument("--eval-batches", type=int, default=3,
                   help="timed evaluation batches (each all halt_max_steps ACT steps, or fewer with --early-exit); "
                        "0 skips the evaluation")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: global_batch_size")
    p.add_argument("--early-exit", action="store_true", help="evaluate with eval_early_exit on (rows stream through "
                   "the batch; the JSON adds the mean ACT steps and row-steps/s)")
    p.add_argument("--eval-halt-bias", type=float, default=None,
                   help="measurement knob: set the halting head's q_halt bias (and zero its weights) before the "
                        "evaluation, so that with --early-exit every row halts at its first step (e.g. 5: the "
                        "streaming worst case, every slot refilled every step); the default leaves the model as "
                        "built, whose head (bias -5) never says halt")
    p.add_argument("--no-compile", action="store_true", help="compile=False (training and evaluation)")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    p.add_argument("--profile", action="store_true", help="then profile a few train steps and eval batches: "
                   "the top-30 kernels by self time, printed and in the JSON (profile_train, profile_eval)")
    p.add_argument("--profile-steps", type=int, default=3, help="train steps profiled with --profile")
    p.add_argument("--profile-eval-batches", type=int, default=1,
                   help="evaluation batches profiled with --profile (each all its ACT steps; 0 skips)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. arch.mlp_t=True global_batch_size=768")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.eval_batches < 0 or args.profile_steps < 1 or args.profile_eval_batches < 0:
        p.error("--steps and --profile-steps must be >= 1, --warmup, --eval-batches and --profile-eval-batches >= 0")

    data_path = args.dataset or "synthetic"
    overrides = list(args.overrides) + [f"data_paths=[{data_path}]", "evaluators=[]", "+project_name=benchmark",
                                        "+run_name=benchmark", f"compile={not args.no_compile}"]
    config = compose_config(args.config, overrides)
    dist_info = distributed.setup_distributed(config.device)
    device = dist_info.device
    torch.manual_seed(config.seed)

    if args.dataset:
        loader, metadata = pretrain.create_loader(config, "train", [args.dataset], dist_info, epochs_per_iter=10**6)
        batches = iter(loader)
    else:
        metadata = synthetic_metadata(args.seq_len, args.vocab_size)
        batches = synthetic_batches(metadata, config.global_batch_size, config.seed)
    estimate = memory.estimate_step_memory(config, metadata, dist_info.world_size, device.type,
                                           pretrain.compiles(config, dist_info))
    state = pretrain.create_train_state(config, metadata, dist_info)
    state.total_steps = 10**9  # the schedule position does not change the cost of a step
    model_cfg = unwrap(state.model).model.config
    flops = model_flops(model_cfg)

    def train(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _set, batch, global_batch_size in itertools.islice(batches, n):
            pretrain.train_batch(config, state, batch, global_batch_size, dist_info)
        sync(device)
        return time.perf_counter() - start

    reset_peak(device)
    warmup_s = train(args.warmup)
    timed_s = train(args.steps)
    step_s = timed_s / args.steps
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "compiled": state.compiled, "world_size": dist_info.world_size,
        "global_batch_size": config.global_batch_size, "micro_batch_size": state.micro_batch_size,
        "seq_len": metadata.seq_len, "vocab_size": metadata.vocab_size,
        "arch": {k: v for k, v in (config.arch.model_extra or {}).items()},
        "warmup_steps": args.warmup, "warmup_s": round(warmup_s, 2), "steps": args.steps,
        "train_ms_per_step": round(1000 * step_s, 2), "steps_per_s": round(1 / step_s, 3),
        "examples_per_s": round(config.global_batch_size / step_s, 1),
        "train_peak_gpu_mem_gib": peak_mem_gib(device),
        # training/memory.py's estimate of the same peak (tensors only, as max_memory_allocated counts them)
        "estimated_peak_gib": round(estimate.tensors / 2**30, 2) if estimate is not None else None,
        "train_flop_per_step": flops["train_step"] * config.global_batch_size,
        "train_tflops_per_s": round(flops["train_step"] * config.global_batch_size / step_s / 1e12, 4),
    }

    if args.profile:
        result.update(profile_train_steps=args.profile_steps,
                      profile_train=profile_table(device, lambda: train(args.profile_steps)))

    if args.eval_batches:
        # The real evaluation: the model pretrain.py would evaluate (the EMA copy when ema=True), the shared loop
        # with every ACT step; the first batch is timed apart since it compiles the eval-mode graph.
        eval_bs = args.eval_batch_size or config.global_batch_size
        eval_model = pretrain.evaluation_model(state)
        if args.eval_halt_bias is not None:
            with torch.no_grad():
                q_head = unwrap(eval_model).model.inner.q_head
                q_head.weight.zero_()
                q_head.bias[0] = args.eval_halt_bias
        eval_metadata = metadata.model_copy(update={"sets": ["all"]})

        eval_metrics = {}

        def eval_pass(n: int) -> float:
            loader = itertools.islice(synthetic_batches(metadata, eval_bs, config.seed + 1), n)
            sync(device)
            start = time.perf_counter()
            eval_metrics.update(evaluate(eval_model, loader, eval_metadata, [], dist_info=dist_info, step=0,
                                         save_dir=None, early_exit=args.early_exit) or {})
            sync(device)
            return time.perf_counter() - start

        eval_warmup_s = eval_pass(1)
        reset_peak(device)
        eval_s = eval_pass(args.eval_batches)
        puzzles = eval_bs * args.eval_batches * dist_info.world_size
        # Mean ACT steps per puzzle: every step without early exit; with it, what the rows used (the `steps` metric)
        act_steps = eval_metrics["all"]["steps"] if args.early_exit and dist_info.is_main else model_cfg.halt_max_steps
        result.update({
            "eval_batch_size": eval_bs, "eval_batches": args.eval_batches, "eval_early_exit": args.early_exit,
            "eval_warmup_s": round(eval_warmup_s, 2), "eval_puzzles_per_s": round(puzzles / eval_s, 1),
            "eval_peak_gpu_mem_gib": peak_mem_gib(device), "eval_halt_bias": args.eval_halt_bias,
            "eval_mean_act_steps": round(act_steps, 4),
            # ACT steps of rows per second: what a halting distribution divides to give puzzles/s
            "eval_row_steps_per_s": round(puzzles * act_steps / eval_s, 1),
            "eval_tflops_per_s": round(flops["act_step_forward"] * act_steps * puzzles / eval_s / 1e12, 4),
        })
        if args.profile and args.profile_eval_batches:
            result.update(profile_eval_batches=args.profile_eval_batches,
                          profile_eval=profile_table(device, lambda: eval_pass(args.profile_eval_batches)))

    if dist_info.is_main:
        for key in ("profile_train", "profile_eval"):
            if key in result:
                print(f"{key}:\n{result[key]}")
        text = json.dumps(result)
        print(text)
        if args.json_out:
            atomic_write_text(args.json_out, text + "\n")
    distributed.cleanup()
    return result


if __name__ == "__main__":
    main()
