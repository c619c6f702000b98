"""Resolve the `module@Class` names that the configs use (`recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1`,
`losses@ACTLossHead`, `arc@ARC`) to classes."""

import importlib
import inspect


def load_model_class(identifier: str, prefix: str = "models."):
    module_path, sep, class_name = identifier.partition("@")
    if not sep or not class_name:
        raise ValueError(f"class name {identifier!r} must look like 'module@Class' (e.g. 'losses@ACTLossHead')")
    try:
        module = importlib.import_module(prefix + module_path)
    except ModuleNotFoundError as e:
        raise ValueError(f"no module {prefix + module_path} for {identifier!r}: {e}") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ValueError(f"module {prefix + module_path} has no class {class_name} (from {identifier!r})") from None


def get_model_source_path(identifier: str, prefix: str = "models.") -> str:
    module_path = identifier.partition("@")[0]
    return inspect.getsourcefile(importlib.import_module(prefix + module_path))
