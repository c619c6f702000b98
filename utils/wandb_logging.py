"""Weights & Biases on rank 0, never prompting: WANDB_MODE decides (online / offline / disabled, as usual);
when it is unset and no API key is configured, runs are logged offline to ./wandb (sync later with
`wandb sync`)."""

import os
from typing import Optional

_run = None


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


def init(config, num_params: Optional[int] = None) -> None:
    global _run
    mode = os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")
    if mode == "disabled":
        return
    import wandb  # slow to import; only when logging

    _run = wandb.init(project=config.project_name, name=config.run_name, config=config.model_dump(), mode=mode,
                      settings=wandb.Settings(x_disable_stats=True, silent=True))
    if num_params is not None:
        _run.log({"num_params": num_params}, step=0)


def log(metrics: dict, step: int) -> None:
    if _run is not None:
        _run.log(metrics, step=step)  # nested {set: {name: value}} as the reference logs it


def finish() -> None:
    global _run
    if _run is not None:
        _run.finish()
        _run = None

