"""The `arch` config section: the model class (`name`), its loss head (`loss`) and the model's own fields, checked
when the section is built (ranges of the shared fields, unknown fields and loss settings with a close match)."""

from typing import Dict, Optional, Tuple

import pydantic
from pydantic import Field

from utils.errors import ConfigError, did_you_mean
from utils.functions import check_settings, load_model_class


class LossConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")  # extra keys go to the loss head's constructor; checked below
    name: str = Field(description="the loss head, `module@Class` under models/ (its other keys go to its constructor)")

    @pydantic.model_validator(mode="after")
    def _check_settings(self):
        try:
            loss_cls = load_model_class(self.name)
        except ConfigError as e:
            raise ConfigError(f"arch.loss.name: {e}") from None
        check_settings(loss_cls, self.model_extra or {}, positional=("model",), prefix="arch.loss.")
        return self


# Ranges of the model fields shared by the variants (name: (low, high, what)); a value outside fails at start.
ARCH_RANGES: Dict[str, Tuple[float, Optional[float], str]] = {
    "H_cycles": (1, None, "a whole number >= 1"), "L_cycles": (1, None, "a whole number >= 1"),
    "H_layers": (0, None, "a whole number >= 0"), "L_layers": (1, None, "a whole number >= 1"),
    "halt_max_steps": (1, None, "a whole number >= 1"), "hidden_size": (1, None, "a whole number >= 1"),
    "num_heads": (1, None, "a whole number >= 1"), "expansion": (0, None, "a number > 0"),
    "puzzle_emb_ndim": (0, None, "a whole number >= 0"), "puzzle_emb_len": (0, None, "a whole number >= 0"),
    "halt_exploration_prob": (0, 1, "a probability in [0, 1]"),
}


class ArchConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")  # the model's own fields; checked by validate_arch below
    name: str = Field(description="the model class, `module@Class` under models/ (set by the arch=<name> file)")
    loss: LossConfig = Field(description="the loss head and its settings")

    @pydantic.model_validator(mode="after")
    def _check_ranges(self):
        for key, (low, high, what) in ARCH_RANGES.items():
            value = (self.model_extra or {}).get(key)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # absent, or a type the model's own config rejects with its own message
            bad = value < low or (high is not None and value > high) or (key == "expansion" and value <= 0)
            if bad:
                raise ConfigError(f"arch.{key}={value} is out of range: it must be {what}")
        return self

    @pydantic.model_validator(mode="after")
    def _check_fields(self):
        validate_arch(self)
        return self


def model_config_fields(arch: ArchConfig) -> set:
    """Field names of the model class's pydantic config (its `config_class`)."""
    model_cls = load_model_class(arch.name)
    return set(model_cls.config_class.model_fields)


# Fields that pretrain.py injects from the dataset; setting them in arch would be overwritten.
INJECTED_ARCH_FIELDS = {"batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers", "causal"}


def validate_arch(arch: ArchConfig) -> None:
    """Every field of `arch` must be a settable field of the model class's config."""
    try:
        known = model_config_fields(arch)
    except ConfigError as e:
        raise ConfigError(f"arch.name: {e}") from None
    for key in arch.model_extra or {}:
        if key not in known or key in INJECTED_ARCH_FIELDS:
            settable = sorted(known - INJECTED_ARCH_FIELDS)
            hint = did_you_mean(f"arch.{key}", [f"arch.{f}" for f in settable])
            raise ConfigError(f"unknown arch field 'arch.{key}' for {arch.name}{hint}; known fields: "
                              f"{', '.join(settable)}")
