"""The project's own error type for bad configuration, and the 'did you mean' hint its messages carry. Here,
below every other package, so that the model's config section and the trainer's can both raise it."""

import difflib


class ConfigError(ValueError):
    """Bad configuration; the message is one line naming the problem and the fix."""


def did_you_mean(key: str, known) -> str:
    """' did you mean H_cycles?' for a close match of `key` among `known` (dotted keys), else ''."""
    prefix, _, leaf = key.rpartition(".")
    same_level = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == prefix]
    match = difflib.get_close_matches(leaf, same_level, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}? ({(prefix + '.' if prefix else '') + match[0]}=...)" if match else ""
