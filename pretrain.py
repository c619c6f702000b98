"""Train a TRM: Hydra config in, checkpoints and W&B metrics out (docs/compatibility.md sections 6-8).

    python pretrain.py arch=trm data_paths="[data/sudoku-extreme-1k-aug-1000]" epochs=50000 ...
    torchrun --nproc-per-node 8 pretrain.py ...          # NCCL on GPUs, gloo on CPUs

Read top to bottom: set-up (device, config, data, model, optimizers), then the loop of train steps, evaluations
and checkpoints. Each piece lives in the module that owns it.

Checkpoints: at every evaluation point the reference-format weights file `<checkpoint_path>/step_<N>`, plus a full
training state `<checkpoint_path>/train_state/step_<N>/` (training/train_state.py; also every checkpoint_every_steps
steps; the newest keep_last_checkpoints are kept). Resume a run with the same command and checkpoint_path (the
same +run_name) plus `+resume=true`: it continues from the newest intact training state exactly as if it had
never stopped, and refuses one written by an incompatible config (exit code 2). SIGTERM or SIGINT: the run
finishes its current step, saves a training state and exits with code 128 + the signal number (143 / 130); a
second signal stops it at once."""

import copy
import os
import shutil
import sys
from typing import List, Optional

import coolname
import hydra
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from inference.model_loader import load_weights_for_training, write_checkpoint_description
from models.build import build_model
from models.ema import EMAHelper
from models.optimizers import AdamATan2
from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed
from puzzle_dataset import PuzzleDatasetConfig, create_dataloader, stop_all_workers
from training import memory, progress, train_state, wandb_logging
from training.checkpoint import save_model_state, unwrap
from training.config import (PretrainConfig, check_batch_divides, check_command_line, check_data_paths, one_line,
                             parse_config, print_error, shell_safe)
from training.evaluation import evaluate
from training.schedule import cosine_schedule_with_warmup_lr
from training.train_state import TrainState
from utils import distributed
from utils.atomic import atomic_path, atomic_write_text
from utils.errors import InputError
from utils.functions import get_model_source_path, load_model_class


# ----------------------------------------------------------------------------------------------------------------
# Set-up

def fill_run_names(config: PretrainConfig) -> PretrainConfig:
    """Rank 0 names the run as the reference does; the names are then broadcast to every rank."""
    if config.project_name is None:
        config.project_name = shell_safe(f"{os.path.basename(config.data_paths[0].rstrip('/')).capitalize()}-ACT-torch")
    if config.run_name is None:  # `<model class>-<two words>`, no space (the reference's had one)
        config.run_name = shell_safe(f"{config.arch.name.split('@')[-1]}-{coolname.generate_slug(2)}")
    if config.checkpoint_path is None:
        config.checkpoint_path = os.path.join("checkpoints", config.project_name, config.run_name)
    return config


def create_loader(config: PretrainConfig, split: str, paths: List[str], dist_info: distributed.DistInfo,
                  epochs_per_iter: int):
    return create_dataloader(PuzzleDatasetConfig(
        seed=config.seed, dataset_paths=paths, global_batch_size=config.global_batch_size,
        test_set_mode=split == "test", epochs_per_iter=epochs_per_iter,
        rank=dist_info.rank, num_replicas=dist_info.world_size), split=split)


def create_evaluators(config: PretrainConfig, eval_metadata) -> list:
    evaluators = []
    for spec in config.evaluators:
        cls = load_model_class(spec.name, "evaluators.")
        for data_path in config.data_paths_test or config.data_paths:
            evaluators.append(cls(data_path=data_path, eval_metadata=eval_metadata, **(spec.model_extra or {})))
    return evaluators


def create_optimizers(config: PretrainConfig, model: torch.nn.Module, world_size: int):
    """Sign-SGD on the sparse puzzle table, AdamATan2 on every weight (docs/compatibility.md section 9)."""
    sparse = lambda: CastedSparseEmbeddingSignSGD_Distributed(
        unwrap(model).model.puzzle_emb.buffers(), world_size=world_size, lr=0,
        weight_decay=config.puzzle_emb_weight_decay)
    dense = lambda: AdamATan2(model.parameters(), lr=0, weight_decay=config.weight_decay,
                              betas=(config.beta1, config.beta2))
    if config.arch.model_extra.get("puzzle_emb_ndim", 0) == 0:
        return [dense()], [config.lr]
    if config.freeze_weights:
        return [sparse()], [config.puzzle_emb_lr]
    return [sparse(), dense()], [config.puzzle_emb_lr, config.lr]


def compiles(config: PretrainConfig, dist_info: distributed.DistInfo) -> bool:
    """Whether the training model is torch.compile'd: on CUDA, unless compile=False or env DISABLE_COMPILE."""
    return config.compile and dist_info.device.type == "cuda" and not os.environ.get("DISABLE_COMPILE")


def create_train_state(config: PretrainConfig, train_metadata, dist_info: distributed.DistInfo,
                       resuming: bool = False) -> TrainState:
    """Model, optimizers and EMA at step 0: initialised, or from load_checkpoint unless a training state will
    overwrite them (`resuming`)."""
    local_batch = check_batch_divides(config.global_batch_size, dist_info.world_size, config.micro_batch_size)
    micro_batch_size = config.micro_batch_size or local_batch
    total_steps = int(config.epochs * train_metadata.total_groups * train_metadata.mean_puzzle_examples
                      / config.global_batch_size)

    model = build_model(config.arch, train_metadata, batch_size=micro_batch_size, device=dist_info.device)
    if dist_info.is_main:
        num_params = sum(p.numel() for p in model.parameters())
        print(f"Model: {config.arch.name}, {num_params:,} parameters (puzzle table excluded), device {dist_info.device}")
        if config.load_checkpoint and not resuming:
            print(f"Loading checkpoint {config.load_checkpoint}")
            load_weights_for_training(model, config.load_checkpoint, config.arch, train_metadata.seq_len)
    distributed.broadcast_module(model)

    compiled = compiles(config, dist_info)
    if compiled:
        model = compile_model(model, config)
    optimizers, base_lrs = create_optimizers(config, model, dist_info.world_size)
    ema = None
    if config.ema:
        ema = EMAHelper(mu=config.ema_rate)
        ema.register(model)
    return TrainState(model=model, optimizers=optimizers, base_lrs=base_lrs,
                      carries=[None] * (local_batch // micro_batch_size),
                      act_generator=train_state.act_generator(config.seed, dist_info.rank, dist_info.device),
                      step=0, total_steps=total_steps, micro_batch_size=micro_batch_size, compiled=compiled, ema=ema)


def compile_model(model: torch.nn.Module, config: PretrainConfig) -> torch.nn.Module:
    """torch.compile with the config's mode; `compile_memory_budget` sets how much of the gradient cycle's
    activations the compiler may keep (it recomputes the cheapest of the rest in backward)."""
    if config.compile_memory_budget is not None:
        import torch._functorch.config as functorch_config  # the compiler's documented knob for this trade-off
        functorch_config.activation_memory_budget = config.compile_memory_budget
    return torch.compile(model, mode=config.compile_mode)


def save_code_and_config(config: PretrainConfig) -> None:
    """Beside the checkpoints: the model and loss source files and the composed config (all_config.yaml)."""
    os.makedirs(config.checkpoint_path, exist_ok=True)
    for identifier in (config.arch.name, config.arch.loss.name):
        source = get_model_source_path(identifier)
        with atomic_path(os.path.join(config.checkpoint_path, os.path.basename(source))) as tmp:
            shutil.copy(source, tmp)
    atomic_write_text(os.path.join(config.checkpoint_path, "all_config.yaml"), yaml.dump(config.model_dump()))


# ----------------------------------------------------------------------------------------------------------------
# Train step

def train_batch(config: PretrainConfig, state: TrainState, batch: dict, global_batch_size: int,
                dist_info: distributed.DistInfo) -> Optional[dict]:
    """One optimizer step over this rank's rows (in micro-batches), gradients summed over ranks.
    Returns the normalised metrics on rank 0 (docs/compatibility.md section 8), None elsewhere or past total_steps."""
    if state.step >= state.total_steps:  # surplus batch: no update, and the step count stays = updates done
        return None
    state.step += 1
    state.model.train()
    batch = {k: v.to(dist_info.device, non_blocking=True) for k, v in batch.items()}

    cuda_graphs = state.compiled and config.compile_mode == "reduce-overhead"
    metric_sums = None
    mb = state.micro_batch_size
    for slot in range(len(state.carries)):
        micro = {k: v[slot * mb:(slot + 1) * mb] for k, v in batch.items()}
        if state.carries[slot] is None:
            state.carries[slot] = unwrap(state.model).initial_carry(micro)  # all rows halted: filled from `micro`
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        state.carries[slot], loss, metrics, _, _ = state.model(return_keys=(), carry=state.carries[slot], batch=micro,
                                                               generator=state.act_generator)
        if cuda_graphs:
            # A CUDA graph's outputs live in its memory pool, which the next replay overwrites.
            state.carries[slot] = train_state.map_carry(torch.clone, state.carries[slot])
        (loss / global_batch_size).backward()
        if len(state.carries) > 1:
            for opt in state.optimizers:
                if isinstance(opt, CastedSparseEmbeddingSignSGD_Distributed):
                    opt.accumulate_local_grads()  # the next micro-batch overwrites the per-batch rows
        metric_keys = sorted(metrics)
        values = torch.stack([metrics[k].detach().to(torch.float64) for k in metric_keys])
        metric_sums = values if metric_sums is None else metric_sums + values

    distributed.all_reduce_sum_coalesced([p.grad for p in state.model.parameters() if p.grad is not None])

    lr = 0.0
    for opt, base_lr in zip(state.optimizers, state.base_lrs):
        lr = cosine_schedule_with_warmup_lr(state.step, base_lr=base_lr, num_warmup_steps=round(config.lr_warmup_steps),
                                            num_training_steps=state.total_steps, min_ratio=config.lr_min_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad()

    distributed.reduce_sum_to_main(metric_sums)
    if not dist_info.is_main:
        return None
    values = dict(zip(metric_keys, metric_sums.cpu().tolist()))
    state.halted_rows = int(values["count"])
    count = max(values["count"], 1)
    out = {f"train/{k}": v / (global_batch_size if k.endswith("loss") else count) for k, v in values.items()}
    out["train/lr"] = lr  # the last optimizer's, i.e. AdamATan2's when both exist
    return out


def evaluation_model(state: TrainState, compile_eval: bool = True) -> torch.nn.Module:
    """The evaluated (and saved) model: the EMA weights when ema=True, else the live model; compiled on CUDA
    unless `compile_eval` is False. The EMA copy is made once and refreshed in place, and an eager model is
    wrapped in torch.compile once, so no evaluation after the first recompiles."""
    model = state.model
    if state.ema is not None:
        if state.ema_model is None:
            state.ema_model = copy.deepcopy(state.model)  # a compiled training model gives a compiled copy
        state.ema_model.load_state_dict(state.model.state_dict())  # buffers too: puzzle table, H_init/L_init
        state.ema.ema(state.ema_model)
        model = state.ema_model
    plain = unwrap(model)
    on_cuda = next(plain.parameters()).device.type == "cuda"
    if not compile_eval or not on_cuda or os.environ.get("DISABLE_COMPILE"):
        return plain
    if model is not plain:
        return model  # already compiled (the training model, or the copy of it)
    if state.eval_compiled is None or unwrap(state.eval_compiled) is not plain:
        state.eval_compiled = torch.compile(plain)
    return state.eval_compiled


# ----------------------------------------------------------------------------------------------------------------
# Main

def setup(hydra_config: DictConfig):
    """Everything before the loop. Problems with the config, data or checkpoint raise InputErrors (utils/errors.py)."""
    raw = OmegaConf.to_container(hydra_config, resolve=True)
    config = parse_config(raw)
    dist_info = distributed.setup_distributed(config.device)
    check_batch_divides(config.global_batch_size, dist_info.world_size, config.micro_batch_size)
    check_data_paths(config.data_paths, "data_paths")
    check_data_paths(config.data_paths_test, "data_paths_test")

    config = distributed.broadcast_object(fill_run_names(config) if dist_info.is_main else None)
    train_state.refuse_existing_run(config, dist_info)
    torch.manual_seed(config.seed + dist_info.rank)  # weight initialisation (rank 0's weights are broadcast)

    epochs_per_iter = config.eval_interval if config.eval_interval is not None else config.epochs
    train_loader, train_metadata = create_loader(config, "train", config.data_paths, dist_info, epochs_per_iter)
    memory.check_fits(config, train_metadata, dist_info, compiles(config, dist_info))  # before anything is allocated
    test_paths = config.data_paths_test or config.data_paths
    eval_loader = eval_metadata = None
    evaluators = []
    if all(os.path.isfile(os.path.join(p, "test", "dataset.json")) for p in test_paths):
        eval_loader, eval_metadata = create_loader(config, "test", test_paths, dist_info, 1)
        evaluators = create_evaluators(config, eval_metadata)
    elif dist_info.is_main:
        print(f"No test split in {test_paths}: training without evaluation (checkpoints are still written)")

    resume_from = train_state.find_resumable(config, dist_info) if config.resume else None
    state = create_train_state(config, train_metadata, dist_info, resuming=resume_from is not None)
    if resume_from is not None:  # before the train loader's first iterator: it sets the loader's position
        train_state.restore(resume_from, config, dist_info, state, train_loader)
    return config, dist_info, train_loader, train_metadata, eval_loader, eval_metadata, evaluators, state


def run(hydra_config: DictConfig) -> None:
    try:
        config, dist_info, train_loader, train_metadata, eval_loader, eval_metadata, evaluators, state = setup(hydra_config)
    except InputError as e:  # the project's own: bad config, data, checkpoint or hub address (anything else is a bug)
        print_error(one_line(e))
        distributed.cleanup()
        sys.exit(2)

    total_iters = config.epochs // (config.eval_interval or config.epochs)
    sets = train_metadata.sets
    bar = None
    if dist_info.is_main:
        bar = progress.TrainProgress(progress.steps_to_run(train_loader.dataset, total_iters * len(sets),
                                                           state.total_steps), initial=state.step)
        save_code_and_config(config)
        wandb_logging.init(config, num_params=sum(p.numel() for p in state.model.parameters()))

    stop = train_state.StopRequest()  # SIGTERM/SIGINT: save at the next step boundary, then exit
    for iter_id in range(train_loader.next_iteration, total_iters):  # a resumed run continues its iteration
        for _set_name, batch, global_batch_size in train_loader:
            if state.step >= state.total_steps:
                # total_steps is an estimate from the dataset's mean puzzle size; the loader may yield more
                # batches (ARC's group-weighted sampling). The surplus is not trained on, and the run ends with
                # this iteration, so the last checkpoint is named after the optimizer steps taken.
                break
            try:
                metrics = train_batch(config, state, batch, global_batch_size, dist_info)
            except torch.OutOfMemoryError:  # CUDA: one line of advice instead of a traceback
                if bar is not None:
                    bar.close()
                print_error(memory.out_of_memory_advice(config, train_metadata, dist_info, state.compiled,
                                                        state.micro_batch_size), every_rank=True)
                sys.exit(1)
            if state.ema is not None:
                state.ema.update(state.model)
            if dist_info.is_main and metrics is not None:
                wandb_logging.log(metrics, step=state.step)
                bar.update(metrics, state.halted_rows)

            signum = stop.agreed(dist_info)
            if signum or (config.checkpoint_every_steps and state.step % config.checkpoint_every_steps == 0):
                train_state.save(config, dist_info, state, train_loader)
            if signum:
                finish(bar, config)
                sys.exit(128 + signum)
        last_iter = iter_id == total_iters - 1 or state.step >= state.total_steps

        if iter_id >= (config.min_eval_interval or 0):
            eval_model = evaluation_model(state, config.eval_compile)
            if eval_loader is not None:
                metrics = evaluate(eval_model, eval_loader, eval_metadata, evaluators, dist_info=dist_info,
                                   step=state.step, save_dir=config.checkpoint_path,
                                   save_outputs=config.eval_save_outputs, early_exit=config.eval_early_exit,
                                   progress=True)
                if dist_info.is_main and metrics is not None:
                    for line in progress.format_eval(state.step, metrics):
                        bar.write(line)
                    wandb_logging.log(metrics, step=state.step)
            if dist_info.is_main and (config.checkpoint_every_eval or last_iter):
                weights_file = os.path.join(config.checkpoint_path, f"step_{state.step}")
                save_model_state(eval_model, weights_file, state.compiled)
                write_checkpoint_description(weights_file, config, train_metadata, state.step)
        train_state.save(config, dist_info, state, train_loader)
        if last_iter:
            break

    stop.uninstall()
    finish(bar, config)


def finish(bar, config: PretrainConfig) -> None:
    if bar is not None:
        bar.close()
        print(f"Checkpoints in {config.checkpoint_path}")
    wandb_logging.finish()
    distributed.cleanup()


@hydra.main(config_path="config", config_name="cfg_pretrain", version_base=None)
def launch(hydra_config: DictConfig) -> None:
    with train_state.end_run_on_error(stop_all_workers):
        run(hydra_config)


if __name__ == "__main__":
    check_command_line(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "cfg_pretrain.yaml"),
                       sys.argv[1:])
    launch()
