"""Typed training configuration (docs/compatibility.md section 7) and its validation at start-up.

Hydra composes config/cfg_pretrain.yaml + config/arch/*.yaml + command-line overrides; `PretrainConfig` then
checks every field, so a typo fails at start with one line instead of being silently ignored."""

import os
import re
import sys
from typing import List, Literal, Optional

import pydantic
from pydantic import Field

from models.arch import ARCH_RANGES, ArchConfig, model_config_fields
from utils.errors import ConfigError, did_you_mean
from utils.functions import check_settings, load_model_class


class EvaluatorConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")  # extra keys go to the evaluator's constructor; checked below
    name: str = Field(description="the evaluator class, `module@Class` under evaluators/ (e.g. arc@ARC)")

    @pydantic.model_validator(mode="after")
    def _check_settings(self):
        try:
            evaluator_cls = load_model_class(self.name, "evaluators.")
        except ConfigError as e:
            raise ConfigError(f"evaluators: {e}") from None
        try:
            check_settings(evaluator_cls, self.model_extra or {}, positional=("data_path", "eval_metadata"))
        except ConfigError as e:
            raise ConfigError(f"evaluators: {e}") from None
        return self


# Each key's `description` is what `python pretrain.py --help` prints (training/config_help.py), so the help cannot
# drift from the keys. The defaults it shows are the yaml's; those below serve the keys the yaml leaves unset.
class PretrainConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    arch: ArchConfig = Field(description="the model: arch=<name> picks config/arch/<name>.yaml, arch.<key>=... "
                                         "sets one of its fields")
    data_paths: List[str] = Field(description="dataset folders to train on, as the dataset builders write them")
    data_paths_test: List[str] = Field([], description="dataset folders to evaluate on; empty: the test splits of "
                                                       "data_paths")
    evaluators: List[EvaluatorConfig] = Field(
        [], description="run at each evaluation: [{name: module@Class under evaluators/, other keys go to its "
                        "constructor}], e.g. [{name: arc@ARC, aggregated_voting: False}]; [] for none")

    global_batch_size: int = Field(ge=1, description="rows per optimizer step over all processes (a multiple of "
                                                     "their number)")
    epochs: int = Field(ge=1, description="passes over the training puzzle groups; total_steps = epochs x groups x "
                                          "mean examples per puzzle / global_batch_size")
    lr: float = Field(ge=0, description="learning rate of the weights (AdamATan2) after warm-up")
    lr_min_ratio: float = Field(ge=0, le=1, description="learning rate at the last step as a fraction of lr, by "
                                                        "cosine decay (1.0: constant after warm-up)")
    lr_warmup_steps: float = Field(ge=0, description="steps of linear warm-up from 0 to lr and puzzle_emb_lr")
    weight_decay: float = Field(ge=0, description="weight decay of the weights (AdamATan2)")
    beta1: float = Field(ge=0, lt=1, description="AdamATan2's decay of the gradient's running mean")
    beta2: float = Field(ge=0, lt=1, description="AdamATan2's decay of the squared gradient's running mean")
    puzzle_emb_lr: float = Field(ge=0, description="learning rate of the per-puzzle embedding table (sign-SGD)")
    puzzle_emb_weight_decay: float = Field(ge=0, description="weight decay of the per-puzzle embedding table")

    project_name: Optional[str] = Field(None, description="W&B project and checkpoints/ sub-folder; unset: <first "
                                                          "data_paths folder, capitalised>-ACT-torch")
    run_name: Optional[str] = Field(None, description="W&B run and checkpoint folder name; unset: <model class>-<two "
                                                      "random words>")
    load_checkpoint: Optional[str] = Field(None, description="weights to start from (a step_<N> file or "
                                                             "hf://owner/repo[/file]) instead of an initialisation")
    checkpoint_path: Optional[str] = Field(None, description="folder of the run's checkpoints, config and outputs; "
                                                             "unset: checkpoints/<project_name>/<run_name>")

    seed: int = Field(0, ge=0, description="seed of every random choice: initialisation (seed + rank), data order, "
                                           "exploration")
    checkpoint_every_eval: bool = Field(False, description="write the step_<N> weights at every evaluation (False: "
                                                           "at the end only)")
    eval_interval: Optional[int] = Field(None, ge=1, description="epochs between evaluations (must divide epochs); "
                                                                 "unset: one evaluation, at the end")
    min_eval_interval: Optional[int] = Field(0, ge=0, description="evaluations start at this iteration (one "
                                                                  "iteration = eval_interval epochs)")
    eval_save_outputs: List[str] = Field([], description="outputs saved at each evaluation to <checkpoint_path>/"
                                                         "step_<N>_all_preds.<rank>, e.g. [inputs,labels,preds]")

    ema: bool = Field(False, description="keep an exponential moving average of the weights; evaluation and "
                                         "step_<N> use it")
    ema_rate: float = Field(0.999, ge=0, le=1, description="EMA decay per step: shadow = rate x shadow + (1 - rate) "
                                                           "x weights")
    freeze_weights: bool = Field(False, description="train only the puzzle embedding table, not the weights")

    # Additions to the reference (all optional, reference behaviour by default).
    device: Optional[str] = Field(None, description="cpu or cuda; unset: CUDA when available, else CPU")
    compile: bool = Field(True, description="torch.compile the training model on CUDA (env DISABLE_COMPILE=1 also "
                                            "turns it off)")
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = Field(
        None, description="torch.compile's mode for the training model: default, reduce-overhead, max-autotune or "
                          "max-autotune-no-cudagraphs (unset: PyTorch's default); docs/performance.md measures them")
    compile_memory_budget: Optional[float] = Field(
        None, gt=0, le=1, description="share (0-1] of the gradient cycle's activations the compiler keeps, "
                                      "recomputing the cheapest of the rest in backward (unset: keep what it "
                                      "chooses); less memory for more step time, docs/performance.md measures it")
    micro_batch_size: Optional[int] = Field(None, ge=1, description="rows per forward on each process; gradients "
                                                                    "accumulate to global_batch_size (unset: all "
                                                                    "rows in one forward)")
    eval_early_exit: bool = Field(False, description="evaluation: each puzzle stops when its halting head says halt "
                                                     "and its batch slot takes the next puzzle")
    eval_compile: bool = Field(True, description="evaluate a torch.compile'd model on CUDA (compiled once per run); "
                                                 "False: eager")
    resume: bool = Field(False, description="continue from the newest complete training state in checkpoint_path "
                                            "(the same command with the same +run_name)")
    keep_last_checkpoints: int = Field(2, ge=1, description="training-state checkpoints kept on disk (the newest)")
    checkpoint_every_steps: Optional[int] = Field(None, ge=1, description="also write a training-state checkpoint "
                                                                          "every N steps (one is always written "
                                                                          "after every eval_interval epochs)")
    metrics_jsonl: bool = Field(False, description="also append every logged metrics dict to <checkpoint_path>/"
                                                   "metrics.jsonl (rank 0)")
    check_memory: bool = Field(True, description="before training, refuse a config whose estimated step memory "
                                                 "exceeds the device's available memory, naming a micro_batch_size "
                                                 "that fits (training/memory.py); False: skip the check")

    @pydantic.field_validator("run_name", "project_name")
    @classmethod
    def _shell_safe_name(cls, name: Optional[str], info: pydantic.ValidationInfo) -> Optional[str]:
        # They name the checkpoint folder: a space or quote would break the printed path in a shell.
        if name is not None and not SHELL_SAFE.fullmatch(name):
            raise ConfigError(f"{info.field_name}={name!r} is not a usable name: use letters, digits and . _ - + = @ , only "
                              f"(e.g. {shell_safe(name).strip('-') or 'my-run'!r})")
        return name

    @pydantic.model_validator(mode="after")
    def _whole_iterations(self):
        if self.eval_interval is not None and self.epochs % self.eval_interval:
            raise ConfigError(f"epochs={self.epochs} must be a multiple of eval_interval={self.eval_interval}")
        return self


SHELL_SAFE = re.compile(r"[A-Za-z0-9._+=@,-]+")  # characters a shell takes literally, unquoted


def shell_safe(name: str) -> str:
    """`name` with every run of other characters replaced by '-', so a printed checkpoint path can be pasted."""
    return re.sub(r"[^A-Za-z0-9._+=@,-]+", "-", name)


def known_keys(arch_fields=()) -> List[str]:
    """Every top-level key and `arch.<field>` for the given model fields."""
    return list(PretrainConfig.model_fields) + [f"arch.{f}" for f in arch_fields]


def format_validation_error(e: pydantic.ValidationError, arch_fields=()) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        return (f"unknown config key '{loc}'{did_you_mean(loc, known_keys(arch_fields))} "
                "(`python pretrain.py --help` lists every key)")
    if err["type"] == "missing":
        return f"config key '{loc}' is required; set it on the command line ({loc}=...)"
    if err["type"] == "value_error" and isinstance(err.get("ctx", {}).get("error"), ConfigError):
        return str(err["ctx"]["error"])
    msg = re.sub(r"^Input should be", "must be", err["msg"])
    return f"config key '{loc}' {msg}, got {err.get('input')!r}; set {loc}=<a valid value>"


def one_line(e: BaseException) -> str:
    """An error's message on one line (pydantic's and Hydra's span several)."""
    if isinstance(e, pydantic.ValidationError):
        return format_validation_error(e)
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def print_error(message: str, every_rank: bool = False) -> None:
    """`error: <message>` on stderr, once per run: under torchrun only rank 0 prints (every rank meets the same
    config error; `every_rank` for an error that may be one rank's alone), as one write ending in a newline so
    other processes' output cannot join the line."""
    if every_rank or os.environ.get("RANK", "0") == "0":
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()


def explain_hydra_error(e: Exception, config_dir: str) -> str:
    """One line for a Hydra composition error: unknown keys with a close match, bad group choices, bad syntax."""
    text = str(e).strip()
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        arch_fields = ()
        if key.startswith("arch."):
            try:
                arch_fields = tuple(_arch_yaml_fields(config_dir)) + tuple(ARCH_RANGES)
            except Exception:  # noqa: BLE001 - only the suggestion is lost
                arch_fields = tuple(ARCH_RANGES)
        if key in PretrainConfig.model_fields:  # a key the yaml leaves unset: Hydra needs it added
            return f"'{key}' is not in config/cfg_pretrain.yaml, so it is set with a +: +{key}=..."
        return (f"unknown config key '{key}'{did_you_mean(key, known_keys(arch_fields))} "
                "(`python pretrain.py --help` lists every key)")
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing:
        group, choice = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        return f"{group}={choice}: there is no config/{group}/{choice}.yaml; choose one of {', '.join(options)}"
    first = text.splitlines()[0] if text else type(e).__name__
    if type(e).__name__ == "OverrideParseException":
        return f"a command-line override is not valid Hydra syntax ({first}); quote lists: 'data_paths=[a,b]'"
    return one_line(e)


def _arch_yaml_fields(config_dir: str) -> List[str]:
    import yaml
    fields = set()
    for name in os.listdir(os.path.join(config_dir, "arch")):
        if name.endswith(".yaml"):
            with open(os.path.join(config_dir, "arch", name)) as f:
                fields |= set(yaml.safe_load(f) or {})
    return sorted(fields - {"defaults"})  # `defaults` is Hydra's list (trm_mlp.yaml extends trm.yaml), not a field


def check_command_line(config_file: str, argv: List[str]) -> None:
    """Compose and validate the command line's overrides before Hydra does, so that any config error is one
    line (`error: ...`) with exit code 2 rather than Hydra's multi-line report. `--help` / `-h` print every key
    (training/config_help.py) and exit; Hydra's own flags (--hydra-help, --cfg, -m, ...) are left to Hydra."""
    from training import config_help

    if any(arg in config_help.HELP_FLAGS for arg in argv):
        try:
            print(config_help.help_text(*config_help.split_help_args(argv, config_file)))
        except ConfigError as e:
            print_error(str(e))
            sys.exit(2)
        sys.exit(0)
    if any(arg.startswith("-") for arg in argv):
        return
    try:
        compose_config(config_file, argv)
    except ConfigError as e:
        print_error(str(e))
        sys.exit(2)


def compose_config(config_file: str, overrides: List[str], fixed: Optional[dict] = None) -> PretrainConfig:
    """Hydra-compose `config_file` (e.g. config/cfg_pretrain.yaml) with command-line style overrides, set the
    `fixed` keys (values that must not be parsed as override syntax, e.g. paths), then validate: what pretrain.py
    gets from @hydra.main, for scripts that have their own argument parser."""
    raw = compose_raw(config_file, overrides)
    raw.update(fixed or {})
    return parse_config(raw)


def compose_raw(config_file: str, overrides: List[str]) -> dict:
    """The Hydra-composed config as a plain dict, not yet validated."""
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
        raise ConfigError(f"override rejected: {explain_hydra_error(e, config_dir)}") from None
    return OmegaConf.to_container(cfg, resolve=True)


def parse_config(raw: dict) -> PretrainConfig:
    try:
        config = PretrainConfig(**raw)
    except pydantic.ValidationError as e:
        arch_name = (raw.get("arch") or {}).get("name") if isinstance(raw.get("arch"), dict) else None
        fields = ()
        if arch_name:
            try:
                fields = tuple(model_config_fields(ArchConfig.model_construct(name=arch_name)))
            except Exception:  # noqa: BLE001 - only the suggestion is lost
                pass
        raise ConfigError(format_validation_error(e, fields)) from None
    return config


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
