"""utils/atomic.py, the one write-then-rename helper every writer uses: the target holds the old or the new
content, never a partial one, and nothing temporary is left behind, whatever the body does."""

import io
import json
import os

import pytest
import torch

from training import train_state
from training.checkpoint import atomic_torch_save
from utils.atomic import atomic_path, atomic_write_text


def test_a_file_is_written_and_replaced_whole(tmp_path):
    target = tmp_path / "new" / "folder" / "out.json"  # missing folders are created
    atomic_write_text(str(target), "first")
    assert target.read_text() == "first"
    with atomic_path(str(target), fsync=True) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and os.path.basename(tmp).startswith(".out.json.tmp-")
        with open(tmp, "w") as f:
            f.write("second")
        assert target.read_text() == "first"  # not visible before the body ends
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["out.json"]


def test_an_error_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("kept")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "kept" and os.listdir(tmp_path) == ["out.txt"]

    with pytest.raises(RuntimeError):  # a folder the body made is removed too
        with atomic_path(str(tmp_path / "dir")) as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            raise RuntimeError
    assert os.listdir(tmp_path) == ["out.txt"]


def test_folders_and_symlinks(tmp_path):
    (tmp_path / "run").mkdir()  # an empty folder is replaced
    with atomic_path(str(tmp_path / "run")) as tmp:
        os.makedirs(tmp)
        (tmp_path / os.path.basename(tmp) / "a.npy").write_bytes(b"x")
    assert os.listdir(tmp_path / "run") == ["a.npy"]

    for run_id in ("20260101-000000", "20260102-000000"):  # a `latest` link moves from one run to the next
        (tmp_path / run_id).mkdir()
        with atomic_path(str(tmp_path / "latest"), fsync=True) as tmp:
            os.symlink(run_id, tmp)
        assert os.readlink(tmp_path / "latest") == run_id
    assert sorted(os.listdir(tmp_path)) == ["20260101-000000", "20260102-000000", "latest", "run"]


def test_writers_keep_their_bytes(tmp_path):
    obj = {"model.inner.H_init": torch.arange(5, dtype=torch.bfloat16), "x": torch.ones(2, 3)}
    atomic_torch_save(obj, str(tmp_path / "step_1"))
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    assert (tmp_path / "step_1").read_bytes() == buffer.getvalue()

    manifest = {"format": 1, "files": {"shared.pt": {"bytes": 3, "sha256": "ab"}}, "name": "é"}
    train_state._write_json(str(tmp_path / "manifest.json"), manifest)
    with open(tmp_path / "expected.json", "w") as f:
        json.dump(manifest, f, indent=1)
    assert (tmp_path / "manifest.json").read_bytes() == (tmp_path / "expected.json").read_bytes()
