"""Typed training configuration (REFERENCE.md section 8.1) and its validation at start-up.

Hydra composes config/cfg_pretrain.yaml + config/arch/*.yaml + command-line overrides; `PretrainConfig` then
checks every field, so a typo fails at start with one line instead of being silently ignored."""

import os
from typing import List, Literal, Optional

import pydantic

from utils.functions import load_model_class


class ConfigError(ValueError):
    """Bad configuration; the message is one line naming the problem and the fix."""


class LossConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")  # extra keys go to the loss head's constructor
    name: str


class ArchConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")  # the model's own fields; checked by validate_arch
    name: str
    loss: LossConfig


class EvaluatorConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")  # extra keys go to the evaluator's constructor
    name: str


class PretrainConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    arch: ArchConfig
    data_paths: List[str]
    data_paths_test: List[str] = []  # non-empty: used for the test split and the evaluators
    evaluators: List[EvaluatorConfig] = []

    global_batch_size: int
    epochs: int
    lr: float
    lr_min_ratio: float
    lr_warmup_steps: float
    weight_decay: float
    beta1: float
    beta2: float
    puzzle_emb_lr: float
    puzzle_emb_weight_decay: float

    project_name: Optional[str] = None
    run_name: Optional[str] = None
    load_checkpoint: Optional[str] = None
    checkpoint_path: Optional[str] = None

    seed: int = 0
    checkpoint_every_eval: bool = False
    eval_interval: Optional[int] = None
    min_eval_interval: Optional[int] = 0  # in iterations
    eval_save_outputs: List[str] = []

    ema: bool = False
    ema_rate: float = 0.999
    freeze_weights: bool = False

    # Additions to the reference (all optional, reference behaviour by default).
    device: Optional[str] = None  # None: CUDA when available, else CPU
    compile: bool = True  # torch.compile on CUDA (env DISABLE_COMPILE=1 also turns it off)
    # torch.compile's mode for the training model (None: PyTorch's default); docs/performance.md measures them.
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = None
    micro_batch_size: Optional[int] = None  # per-rank rows per forward; gradients accumulate to global_batch_size
    eval_early_exit: bool = False  # stop an eval batch once every row's halting head says halt
    eval_compile: bool = True  # evaluate a torch.compile'd model on CUDA (compiled once per run); False: eager
    resume: bool = False  # continue from the newest complete training-state checkpoint of this run
    keep_last_checkpoints: int = 2  # training-state checkpoints kept on disk
    checkpoint_every_steps: Optional[int] = None  # also write a training-state checkpoint every N steps
    metrics_jsonl: bool = False  # rank 0 also appends every logged metrics dict to <checkpoint_path>/metrics.jsonl


def format_validation_error(e: pydantic.ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown config key '{loc}'; check its spelling against config/cfg_pretrain.yaml"
    if err["type"] == "missing":
        return f"config key '{loc}' is required; set it on the command line ({loc}=...)"
    return f"config key '{loc}': {err['msg']} (got {err.get('input')!r})"


def compose_config(config_file: str, overrides: List[str], fixed: Optional[dict] = None) -> PretrainConfig:
    """Hydra-compose `config_file` (e.g. config/cfg_pretrain.yaml) with command-line style overrides, set the
    `fixed` keys (values that must not be parsed as override syntax, e.g. paths), then validate: what pretrain.py
    gets from @hydra.main, for scripts that have their own argument parser."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    config_file = os.path.abspath(config_file)
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file {config_file} does not exist; pass e.g. --config config/cfg_pretrain.yaml")
    config_dir = os.path.dirname(config_file)
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            cfg = compose(config_name=os.path.splitext(os.path.basename(config_file))[0], overrides=overrides)
    except HydraException as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"override rejected: {reason} (keys: {config_file}; arch choices: "
                          f"{os.path.join(config_dir, 'arch')})") from None
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.update(fixed or {})
    return parse_config(raw)


def parse_config(raw: dict) -> PretrainConfig:
    try:
        config = PretrainConfig(**raw)
    except pydantic.ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    validate_arch(config.arch)
    return config


def model_config_fields(arch: ArchConfig) -> set:
    """Field names of the model class's pydantic config (its `config_class`)."""
    model_cls = load_model_class(arch.name)
    return set(model_cls.config_class.model_fields)


# Fields that pretrain.py injects from the dataset; setting them in arch would be overwritten.
INJECTED_ARCH_FIELDS = {"batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers", "causal"}


def validate_arch(arch: ArchConfig) -> None:
    try:
        known = model_config_fields(arch)
    except ValueError as e:
        raise ConfigError(f"arch.name: {e}") from None
    for key in arch.model_extra or {}:
        if key not in known or key in INJECTED_ARCH_FIELDS:
            raise ConfigError(f"unknown arch field 'arch.{key}' for {arch.name}; known fields: {', '.join(sorted(known - INJECTED_ARCH_FIELDS))}")


def check_batch_divides(global_batch_size: int, world_size: int, micro_batch_size: Optional[int]) -> int:
    """Rows per rank; fails when the global batch does not split evenly."""
    if global_batch_size % world_size:
        raise ConfigError(f"global_batch_size={global_batch_size} is not divisible by the world size {world_size}; "
                          f"choose a multiple of {world_size}")
    local = global_batch_size // world_size
    if micro_batch_size is not None and (micro_batch_size <= 0 or local % micro_batch_size):
        raise ConfigError(f"micro_batch_size={micro_batch_size} must divide the per-rank batch {local} "
                          f"(global_batch_size {global_batch_size} / {world_size} ranks)")
    return local


def check_data_paths(paths: List[str], what: str) -> None:
    for path in paths:
        if not os.path.isdir(path):
            raise ConfigError(f"{what}: dataset folder {path} does not exist; build it first (see README, 'Datasets')")
