"""Weights & Biases on rank 0, never prompting: WANDB_MODE decides (online / offline / disabled, as usual);
when it is unset and no API key is configured, runs are logged offline to ./wandb (sync later with
`wandb sync`).

With `metrics_jsonl=True` in the config, every logged dict is also appended, whatever WANDB_MODE says, as one
JSON line {"step": N, <metrics>} to <checkpoint_path>/metrics.jsonl: a local record that scripts and tests can read."""

import json
import os
from typing import Optional

_run = None
_jsonl_path: Optional[str] = None


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


def init(config, num_params: Optional[int] = None) -> None:
    global _run, _jsonl_path
    _jsonl_path = None
    if getattr(config, "metrics_jsonl", False) and config.checkpoint_path:
        os.makedirs(config.checkpoint_path, exist_ok=True)
        _jsonl_path = os.path.join(config.checkpoint_path, "metrics.jsonl")
        if num_params is not None:
            _append_jsonl({"num_params": num_params}, step=0)
    mode = os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")
    if mode == "disabled":
        return
    import wandb  # slow to import; only when logging

    _run = wandb.init(project=config.project_name, name=config.run_name, config=config.model_dump(), mode=mode,
                      settings=wandb.Settings(x_disable_stats=True, silent=True))
    if num_params is not None:
        _run.log({"num_params": num_params}, step=0)


def _append_jsonl(metrics: dict, step: int) -> None:
    with open(_jsonl_path, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def log(metrics: dict, step: int) -> None:
    if _jsonl_path is not None:
        _append_jsonl(metrics, step)
    if _run is not None:
        _run.log(metrics, step=step)  # nested {set: {name: value}} as the reference logs it


def finish() -> None:
    global _run, _jsonl_path
    _jsonl_path = None
    if _run is not None:
        _run.finish()
        _run = None

