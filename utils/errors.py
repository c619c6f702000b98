"""The project's own error types, and the 'did you mean' hint their messages carry. Here, below every other package,
so that every part can raise them. `InputError` is what pretrain.py and the scripts report as one line `error: ...`
with exit code 2: bad input found at start-up. Any other exception is a bug and keeps its traceback."""

import difflib


class InputError(ValueError):
    """Input that cannot be used as given (config, dataset, checkpoint, hub address); the message is one line
    naming the problem and the fix."""


class ConfigError(InputError):
    """Bad configuration."""


class CheckpointError(InputError):
    """A checkpoint that cannot be used as asked."""


class DataError(InputError):
    """A dataset folder whose files cannot be used (malformed, or not matching the others loaded with it)."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder that the input names does not exist."""


def did_you_mean(key: str, known) -> str:
    """' did you mean H_cycles?' for a close match of `key` among `known` (dotted keys), else ''."""
    prefix, _, leaf = key.rpartition(".")
    same_level = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == prefix]
    match = difflib.get_close_matches(leaf, same_level, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}? ({(prefix + '.' if prefix else '') + match[0]}=...)" if match else ""
