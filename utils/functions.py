"""Resolve the `module@Class` names that the configs use (`recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1`,
`losses@ACTLossHead`, `arc@ARC`) to classes, and check the settings a config passes to such a class's constructor."""

import importlib
import inspect
from typing import Any, Dict, Sequence

import pydantic

from utils.errors import ConfigError, did_you_mean


def load_model_class(identifier: str, prefix: str = "models."):
    module_path, sep, class_name = identifier.partition("@")
    if not sep or not class_name:
        raise ConfigError(f"class name {identifier!r} must look like 'module@Class' (e.g. 'losses@ACTLossHead')")
    try:
        module = importlib.import_module(prefix + module_path)
    except ModuleNotFoundError as e:
        raise ConfigError(f"no module {prefix + module_path} for {identifier!r}: {e}") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ConfigError(f"module {prefix + module_path} has no class {class_name} (from {identifier!r})") from None


def get_model_source_path(identifier: str, prefix: str = "models.") -> str:
    module_path = identifier.partition("@")[0]
    return inspect.getsourcefile(importlib.import_module(prefix + module_path))


def check_settings(cls, settings: Dict[str, Any], positional: Sequence[str], prefix: str = "") -> None:
    """Refuse (ConfigError) `settings` that `cls(<positional>, **settings)` would not take: an unknown key (with a
    close match), a missing required one, or a value of the wrong type for its annotation. `positional`: the
    constructor's leading parameters that the code passes itself (after self); `prefix`: how the config spells
    the settings' keys (e.g. 'arch.loss.')."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1 + len(positional):]
    known = [p.name for p in params]
    for key in settings:
        if key not in known:
            hint = did_you_mean(prefix + key, [prefix + k for k in known])
            raise ConfigError(f"unknown key '{prefix}{key}' for {cls.__name__}{hint}; its keys: {', '.join(known)}")
    fields = {p.name: (Any if p.annotation is inspect.Parameter.empty else p.annotation,
                       ... if p.default is inspect.Parameter.empty else p.default) for p in params}
    model = pydantic.create_model(f"{cls.__name__}Settings", __config__=pydantic.ConfigDict(arbitrary_types_allowed=True),
                                  **fields)
    try:
        model(**settings)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = prefix + ".".join(str(x) for x in err["loc"])
        if err["type"] == "missing":
            raise ConfigError(f"'{key}' is required by {cls.__name__}; set it ({key}=...)") from None
        message = err["msg"].replace("Input should be", "must be")
        raise ConfigError(f"'{key}' of {cls.__name__} {message}, got {err.get('input')!r}") from None
