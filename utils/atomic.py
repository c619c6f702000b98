"""Files that readers (and a crash) see either whole or not at all: every writer of the project writes under a
temporary name beside the target and renames it over the target in one step."""

import contextlib
import os
import shutil
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path in the folder of `path` (created if missing) for the body to write a file, a folder or
    a symlink at; when the body succeeds, rename it to `path` (replacing a file or an empty folder there). On an
    error the temporary is removed and `path` is left as it was.

    fsync: flush the written data to disk before the rename, so that a machine crash right after cannot leave an
    empty or truncated file under the final name (for checkpoints; not needed for a file that is cheap to redo).
    The temporary's name starts with a dot and ends in `.tmp-<pid>`: listings of `step_*` never match it."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    _remove(tmp)  # left behind by a killed process that had this pid
    try:
        yield tmp
        if fsync and not os.path.islink(tmp):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def atomic_write_text(path: str, text: str, fsync: bool = False) -> None:
    """`path` holds exactly `text` (written in text mode, as `open(path, "w")` would), or is left as it was."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
