"""Build the loss head + TRM from an `arch` config and the dataset's metadata: the one constructor that
training, evaluation and tests share."""

import pydantic
import torch

from dataset.common import PuzzleDatasetMetadata
from models.arch import ArchConfig
from utils.errors import ConfigError
from utils.functions import load_model_class


def model_config_dict(arch: ArchConfig, metadata: PuzzleDatasetMetadata, batch_size: int, device: torch.device) -> dict:
    """The model's config: the arch fields plus what the dataset fixes (docs/compatibility.md section 4), checked
    by the model class's config (ConfigError, one line): its checks need the dataset's fields, so they run here
    rather than with the rest of the config."""
    cfg = dict(arch.model_extra or {})
    cfg.update(batch_size=batch_size, vocab_size=metadata.vocab_size, seq_len=metadata.seq_len,
               num_puzzle_identifiers=metadata.num_puzzle_identifiers, causal=False)
    # bfloat16 on the CPU is slow and its matmuls are emulated on many machines: train there in float32.
    if device.type == "cpu" and cfg.get("forward_dtype", "bfloat16") == "bfloat16":
        cfg["forward_dtype"] = "float32"
    try:
        load_model_class(arch.name).config_class(**cfg)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        message = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        where = f"arch.{'.'.join(map(str, err['loc']))}={err.get('input')!r}" if err["loc"] else f"arch ({arch.name})"
        raise ConfigError(f"{where}: {message}") from None
    return cfg


def build_model(arch: ArchConfig, metadata: PuzzleDatasetMetadata, batch_size: int, device: torch.device) -> torch.nn.Module:
    model_cls = load_model_class(arch.name)
    loss_cls = load_model_class(arch.loss.name)
    config_dict = model_config_dict(arch, metadata, batch_size, device)
    with torch.device(device):
        model = model_cls(config_dict)
        return loss_cls(model, **(arch.loss.model_extra or {}))
