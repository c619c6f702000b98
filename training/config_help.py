"""`python pretrain.py --help`: every config key with its default and what it does, rendered from the config
models' field descriptions (training/config.py, the model class's config, the loss head's and evaluators'
CONFIG_HELP), so the help lists exactly the keys the code reads."""

import inspect
import os
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pydantic
from pydantic_core import PydanticUndefined

from models.arch import INJECTED_ARCH_FIELDS, ArchConfig, LossConfig
from training.config import PretrainConfig, compose_raw
from utils.functions import load_model_class

KEY_COLUMN = 36  # where the descriptions start
WIDTH = 118

HELP_FLAGS = ("--help", "-h")
CONFIG_NAME_FLAGS = ("--config-name", "-cn")


def split_help_args(argv: Sequence[str], config_file: str) -> Tuple[str, List[str]]:
    """(config file, overrides) of a `--help` command line: `--config-name NAME` picks config/NAME.yaml beside
    `config_file`; every other flag is dropped, every `key=value` kept."""
    overrides, args = [], list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name in CONFIG_NAME_FLAGS:
            value = value if eq else (args.pop(0) if args else "")
            config_file = os.path.join(os.path.dirname(config_file), value.removesuffix(".yaml") + ".yaml")
        elif not arg.startswith("-"):
            overrides.append(arg)
    return config_file, overrides


def format_value(value: Any) -> str:
    """A value as it is written in an override (null, True, [a,b], {k: v})."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def field_default(field: pydantic.fields.FieldInfo) -> Optional[str]:
    """The model's own default, or None for a required field."""
    if field.default is not PydanticUndefined:
        return format_value(field.default)
    if field.default_factory is not None:
        return format_value(field.default_factory())
    return None


def constructor_defaults(cls) -> Dict[str, str]:
    return {name: format_value(p.default) for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def key_line(key: str, composed: Dict[str, Any], default: Optional[str], description: str, prefix: str = "",
             plus: bool = True) -> str:
    """One key: `key=value` as composed, else `+key=default` (Hydra needs the + for a key the config leaves unset;
    `plus` False: a key inside a list entry, where no + applies), then its description, wrapped."""
    if key in composed:
        shown = f"{prefix}{key}={format_value(composed[key])}"
    else:
        shown = ("+" if plus else "") + f"{prefix}{key}=" + (default if default is not None else "<required>")
    indent = " " * KEY_COLUMN
    first = f"  {shown}"
    if len(first) < KEY_COLUMN - 1:
        return textwrap.fill(description, WIDTH, initial_indent=first.ljust(KEY_COLUMN), subsequent_indent=indent,
                             break_on_hyphens=False)
    return first + "\n" + textwrap.fill(description, WIDTH, initial_indent=indent, subsequent_indent=indent,
                                        break_on_hyphens=False)


def help_text(config_file: str, overrides: Sequence[str] = ()) -> str:
    """The help for the config that `config_file` + `overrides` compose (overrides change the defaults shown,
    `arch=<name>` the arch keys listed). Raises ConfigError for overrides that do not compose."""
    raw = compose_raw(config_file, list(overrides))
    config_name = os.path.relpath(config_file)
    lines = [
        "usage: python pretrain.py [--config-name NAME] [KEY=VALUE ...] [+KEY=VALUE ...]",
        "       torchrun --nproc-per-node N pretrain.py [KEY=VALUE ...]",
        "",
        "Train a TRM. Every setting is a Hydra override: KEY=VALUE for a key the config file sets, +KEY=VALUE for",
        "one it leaves unset (listed with a + below). Shown: each key with its value in the composed config",
        f"({config_name}{' + ' + ' '.join(overrides) if overrides else ''}), else its default, and what it does.",
        "--config-name NAME: config/NAME.yaml instead (e.g. cfg_quickstart). Overrides given with --help change what",
        "is shown: `python pretrain.py arch=hrm --help` lists HRM's arch keys. Hydra's own flags: --hydra-help.",
        "",
        "Training keys:",
    ]
    for key, field in PretrainConfig.model_fields.items():
        if key != "arch":
            lines.append(key_line(key, raw, field_default(field), field.description))

    arch = raw.get("arch") or {}
    model_cls = load_model_class(arch["name"])
    lines += ["", f"Architecture keys (arch.<key>; arch={arch['name']}):"]
    lines.append(key_line("name", arch, None, ArchConfig.model_fields["name"].description, prefix="arch."))
    for key, field in model_cls.config_class.model_fields.items():
        if key not in INJECTED_ARCH_FIELDS:
            lines.append(key_line(key, arch, field_default(field), field.description, prefix="arch."))

    loss = arch.get("loss") or {}
    loss_cls = load_model_class(loss["name"])
    lines += ["", f"Loss keys (arch.loss.<key>; {loss['name']}):"]
    lines.append(key_line("name", loss, None, LossConfig.model_fields["name"].description, prefix="arch.loss."))
    defaults = constructor_defaults(loss_cls)
    for key, description in loss_cls.CONFIG_HELP.items():
        lines.append(key_line(key, loss, defaults.get(key), description, prefix="arch.loss."))

    for spec in raw.get("evaluators") or []:
        evaluator_cls = load_model_class(spec["name"], "evaluators.")
        defaults = constructor_defaults(evaluator_cls)
        lines += ["", f"Evaluator keys (in evaluators=[{{name: {spec['name']}, <key>: <value>}}]):"]
        for key, description in evaluator_cls.CONFIG_HELP.items():
            lines.append(key_line(key, spec, defaults.get(key), description, plus=False))
    lines += ["", "Set from the dataset, not settable: " + ", ".join(f"arch.{k}" for k in sorted(INJECTED_ARCH_FIELDS))]
    return "\n".join(lines)
