"""Evaluate a checkpoint on a dataset's test split (the fork's eval-only runner, docs/compatibility.md section 10.2).

    python scripts/run_eval_only.py --checkpoint trained_models/step_32550_sudoku_epoch50k \
        --dataset data/sudoku-extreme-1k-aug-1000 --one-batch
    torchrun --nproc_per_node=8 scripts/run_eval_only.py --checkpoint hf://alphaXiv/trm-model-maze \
        --dataset data/maze-30x30-hard-1k --outdir checkpoints/maze_eval_run --global-batch-size 1536

The architecture comes from the checkpoint (inference/model_loader.py): its `step_<N>.config.yaml`, else its run
folder's `all_config.yaml`, else what the weights determine (one printed line names what was assumed). Trailing
`key=value` arguments are Hydra overrides and win (e.g. `arch.L_cycles=4`); one that contradicts the weights is
refused. Prints the metrics with Wilson 95% intervals and writes them, with the checkpoint and
dataset used, to `<outdir>/eval_report.json`."""

import argparse
import itertools
import json
import os
import sys
import time
from typing import Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from anywhere, as `python scripts/run_eval_only.py`

import torch  # noqa: E402

from inference import recording  # noqa: E402
from inference.model_loader import load_model_from_checkpoint  # noqa: E402
from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig, create_dataloader  # noqa: E402
from training.checkpoint import load_model_state, read_state_dict, unwrap  # noqa: E402
import training.config  # noqa: E402
from training.config import check_batch_divides  # noqa: E402
from training.evaluation import evaluate  # noqa: E402
from utils import distributed  # noqa: E402
from utils.atomic import atomic_write_text  # noqa: E402
from utils.errors import ConfigError, InputError, MissingInputError  # noqa: E402
from utils.functions import load_model_class  # noqa: E402
from utils.hub import resolve_checkpoint  # noqa: E402
from utils.stats import format_wilson_line, wilson_interval  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO_ROOT, "config", "cfg_pretrain.yaml"),
                   help="Hydra config file (default: config/cfg_pretrain.yaml)")
    p.add_argument("--checkpoint", required=True, help="step_<N> file, a training run's folder (its highest step_<N>), or "
                                                      "hf://owner/repo[/file] on the Hugging Face hub")
    p.add_argument("--dataset", required=True, help="dataset folder with test/ (as the builders write it)")
    p.add_argument("--outdir", default=os.path.join("checkpoints", "eval_run"), help="where outputs and the report go")
    p.add_argument("--eval-save-outputs", nargs="*", default=["inputs", "labels", "puzzle_identifiers", "preds"],
                   help="outputs saved per rank to <outdir>/step_0_all_preds.<rank>")
    p.add_argument("--global-batch-size", type=int, default=None, help="default: the config's global_batch_size")
    p.add_argument("--apply-ema", action=argparse.BooleanOptionalAction, default=True,
                   help="with --ema-shadow: evaluate the EMA weights; without: the checkpoint is taken as already EMA")
    p.add_argument("--ema-shadow", default=None, help="EMA shadow state dict (name -> tensor) to apply")
    p.add_argument("--eval-only", action=argparse.BooleanOptionalAction, default=True,
                   help="kept for compatibility: this runner never builds optimizers")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 forward on CUDA (float32 with --no-bf16; always float32 on CPU)")
    p.add_argument("--one-batch", action="store_true",
                   help="evaluate one batch drawn like a training batch (seed + 1) from the test split")
    p.add_argument("--early-exit", action="store_true",
                   help="each puzzle stops when its halting head says halt and its batch slot takes the next "
                        "puzzle; reports the mean ACT steps")
    p.add_argument("--record-puzzles", default=None,
                   help="test example indices (e.g. 0,3,5-7; 'none' to skip; default: the first 8) whose every ACT "
                        "step is recorded, with sigmoid(q_halt), into <outdir>/visualizer.json for the visualizer pages")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate a torch.compile'd model on CUDA (the first batch compiles); --no-compile: eager")
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. arch=trm_mlp arch.L_cycles=4")
    return p.parse_intermixed_args(argv)  # overrides may come before, between or after the options


def runner_overrides(args: argparse.Namespace) -> List[str]:
    """The command line's Hydra overrides plus those its options stand for."""
    overrides = list(args.overrides)
    if args.global_batch_size is not None:
        overrides.append(f"global_batch_size={args.global_batch_size}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if not args.bf16:
        overrides.append("arch.forward_dtype=float32")
    return overrides


def compose_config(args: argparse.Namespace):
    overrides = runner_overrides(args)
    # The dataset path is set after composing: a ',' in a path would split it as an override.
    config = training.config.compose_config(args.config, overrides, fixed=dict(data_paths=[args.dataset], data_paths_test=[]))
    # Evaluators need the dataset's ARC files; other tasks have none.
    if not os.path.isfile(os.path.join(args.dataset, "test_puzzles.json")):
        config.evaluators = []
    return config


def apply_ema_shadow(model: torch.nn.Module, args: argparse.Namespace) -> None:
    if args.apply_ema and args.ema_shadow:
        # A shadow holds the averaged values of the trained parameters (names with or without wrapper prefixes).
        shadow = read_state_dict(args.ema_shadow)
        merged = {**unwrap(model).state_dict(), **shadow}
        load_model_state(model, merged, resize_puzzle_table=False, source=args.ema_shadow)


def one_batch_loader(config, dist_info: distributed.DistInfo, dataset_path: str):
    """The first batch that the training sampler draws from the test split (its first pass: Philox seed + 1), or None."""
    dataset = PuzzleDataset(PuzzleDatasetConfig(
        seed=config.seed, dataset_paths=[dataset_path], global_batch_size=config.global_batch_size,
        test_set_mode=False, epochs_per_iter=1, rank=dist_info.rank, num_replicas=dist_info.world_size), split="test")
    first = list(itertools.islice(iter(dataset), 1))
    return first or None


def wilson_report(metrics: Dict, counts: Dict) -> Dict[str, Dict[str, float]]:
    """Wilson 95% intervals, each with N = what was actually scored (rows, labelled tokens, ARC test pairs)."""
    out = {}
    for set_name, values in metrics.items():
        if not isinstance(values, dict) or set_name not in counts:
            continue
        for metric, n in (("exact_accuracy", counts[set_name]["count"]), ("accuracy", counts[set_name]["tokens"])):
            if metric in values:
                lo, hi = wilson_interval(values[metric], n)
                out[f"{set_name}.{metric}"] = {"p": values[metric], "n": n, "lo": lo, "hi": hi}
    for key, value in metrics.items():
        if key.startswith("ARC/example_pass@") and "ARC/example_N" in metrics:
            n = int(metrics["ARC/example_N"])
            lo, hi = wilson_interval(value, n)
            out[key] = {"p": value, "n": n, "lo": lo, "hi": hi}
    return out


def write_visualizer_json(model, args, metadata, dist_info, rows: List[int]) -> None:
    """The pages' JSON: every ACT step of the chosen test examples."""
    split = recording.TestSplit(args.dataset, metadata)
    examples = recording.record_examples(model, split, rows, dist_info.device)
    document = recording.visualizer_document(metadata, examples, checkpoint=args.checkpoint, dataset=args.dataset,
                                             preds_file="step_0_all_preds.0")
    path = os.path.join(args.outdir, recording.VISUALIZER_JSON)
    recording.write_visualizer_json(path, document)
    print(f"Visualizer: {path} ({len(examples)} puzzles, every ACT step)")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # strict IEEE fp32 matmuls where fp32 is used
    torch.backends.cudnn.allow_tf32 = False

    try:
        config = compose_config(args)
        dist_info = distributed.setup_distributed(config.device)
        local_batch = check_batch_divides(config.global_batch_size, dist_info.world_size, None)
        test_json = os.path.join(args.dataset, "test", "dataset.json")
        if not os.path.isfile(test_json):
            raise MissingInputError(f"{test_json} not found: --dataset must be a folder written by a dataset builder")
        eval_loader, eval_metadata = create_dataloader(PuzzleDatasetConfig(
            seed=config.seed, dataset_paths=[args.dataset], global_batch_size=config.global_batch_size,
            test_set_mode=True, epochs_per_iter=1, rank=dist_info.rank, num_replicas=dist_info.world_size), split="test")
        # Every rank: nodes need not share a hub cache.
        checkpoint_path = resolve_checkpoint(args.checkpoint, verbose=dist_info.is_main)
        torch.manual_seed(config.seed + dist_info.rank)
        loaded = load_model_from_checkpoint(checkpoint_path, dataset_metadata=eval_metadata,
                                            overrides=runner_overrides(args), device=dist_info.device,
                                            batch_size=local_batch, config=config, config_file=args.config,
                                            verbose=dist_info.is_main)
        model, config = loaded.model, loaded.config
        apply_ema_shadow(model, args)
        num_test_rows = len(recording.TestSplit(args.dataset, eval_metadata))
        if args.record_puzzles is None:
            record_rows = list(range(min(8, num_test_rows)))
        else:
            record_rows = recording.parse_rows(args.record_puzzles)
            bad = [r for r in record_rows if not 0 <= r < num_test_rows]
            if bad:
                raise ConfigError(f"--record-puzzles {bad[0]} is out of range: the test split has {num_test_rows} "
                                 f"examples (0..{num_test_rows - 1})")
        evaluators = [load_model_class(spec.name, "evaluators.")(data_path=args.dataset, eval_metadata=eval_metadata,
                                                                 **(spec.model_extra or {}))
                      for spec in config.evaluators]
    except (InputError, FileNotFoundError) as e:  # bad input: one line; anything else is a bug
        print(f"error: {e}", file=sys.stderr)
        distributed.cleanup()
        return 2

    loader = eval_loader
    if args.one_batch:
        loader = one_batch_loader(config, dist_info, args.dataset)
        if loader is None:
            if dist_info.is_main:
                print("NO EVAL DATA FOUND")
            distributed.cleanup()
            return 0

    os.makedirs(args.outdir, exist_ok=True)
    counts: Dict[str, Dict[str, int]] = {}
    # Compiled for the evaluation loop alone: the per-step recording below runs other shapes, eager.
    eval_model = torch.compile(model) if args.compile and dist_info.device.type == "cuda" else model
    started = time.perf_counter()
    metrics = evaluate(eval_model, loader, eval_metadata, evaluators, dist_info=dist_info, step=0, save_dir=args.outdir,
                       save_outputs=args.eval_save_outputs, early_exit=args.early_exit, progress=True,
                       counts_out=counts)
    eval_seconds = time.perf_counter() - started  # the evaluation loop, compilation of its first batch included
    if dist_info.is_main:
        metrics = metrics or {}  # an empty test split scores nothing
        print("Run metrics:", metrics)
        intervals = wilson_report(metrics, counts)
        for name, ci in intervals.items():
            print(format_wilson_line(name, ci["p"], ci["lo"], ci["hi"], ci["n"]))
        report = {
            "checkpoint": args.checkpoint, "checkpoint_file": checkpoint_path, "dataset": args.dataset,
            "arch": {**config.arch.model_dump(), "forward_dtype": unwrap(model).model.config.forward_dtype},
            "global_batch_size": config.global_batch_size,
            "one_batch": args.one_batch, "early_exit": args.early_exit, "world_size": dist_info.world_size,
            "metrics": metrics, "counts": counts, "wilson_95": intervals, "eval_seconds": round(eval_seconds, 3),
            "per_task": {type(e).__name__: getattr(e, "per_task", None) for e in evaluators} or None,
        }
        report_path = os.path.join(args.outdir, "eval_report.json")
        atomic_write_text(report_path, json.dumps(report, indent=2))
        if record_rows:  # `--record-puzzles none`: no page data, rather than an empty file
            write_visualizer_json(model, args, eval_metadata, dist_info, record_rows)
        print(f"Report: {report_path}; outputs: {args.outdir}")
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
