"""resolve_checkpoint: local paths, hf:// specs served by real huggingface_hub calls from a local folder laid out
as the HF cache (offline mode), and the one-line error when the hub cannot be reached.

huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE / HF_ENDPOINT at import time, so hub resolutions run in a
subprocess with the environment set."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from utils.hub import resolve_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens

# Prints one JSON line per spec: {"path": ...} or {"error": <class name, FileNotFoundError for any of its
# subclasses>, "message": ...}.
RESOLVE_SCRIPT = """
import json, sys, time
from utils.hub import resolve_checkpoint
time.sleep = lambda seconds: None  # huggingface_hub still retries an unreachable hub, without its ~23 s of backoff
for spec in sys.argv[1:]:
    try:
        print(json.dumps({"path": resolve_checkpoint(spec)}))
    except (OSError, ValueError) as e:
        name = "FileNotFoundError" if isinstance(e, FileNotFoundError) else type(e).__name__
        print(json.dumps({"error": name, "message": str(e)}))
"""


def hub_env(cache_dir, offline):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        PYTHONPATH=REPO,
        HF_HOME=str(cache_dir / "home"),
        HF_HUB_CACHE=str(cache_dir / "hub"),
        HF_ENDPOINT=UNREACHABLE_ENDPOINT,  # even in offline mode: never touch the real hub from a test
        HF_HUB_ETAG_TIMEOUT="1",
        HF_HUB_DOWNLOAD_TIMEOUT="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def start_resolve(specs, env):
    return subprocess.Popen(
        [sys.executable, "-c", RESOLVE_SCRIPT, *specs], env=env, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def finish_resolve(proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def resolve(specs, env):
    return finish_resolve(start_resolve(specs, env))


def cache_repo(cache_dir, repo_id, files):
    """Lay out `repo_id` in the HF cache as a download would: blobs, a snapshot of symlinks, refs/main."""
    repo_dir = cache_dir / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "blobs").mkdir()
    snapshot = repo_dir / "snapshots" / COMMIT
    for i, (name, content) in enumerate(files.items()):
        blob = repo_dir / "blobs" / f"{i:040x}"
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def assert_one_line_unreachable(result, spec):
    assert result["error"] == "HubUnreachableError"
    message = result["message"]
    assert "\n" not in message
    assert f"could not reach the Hugging Face Hub for {spec}" in message
    assert "pass its local path to --checkpoint" in message


def test_local_paths(tmp_path):
    checkpoint = tmp_path / "step_10"
    checkpoint.write_bytes(b"weights")
    assert resolve_checkpoint(str(checkpoint)) == str(checkpoint)
    with pytest.raises(FileNotFoundError, match=r"^checkpoint \S+ does not exist") as info:
        resolve_checkpoint(str(tmp_path / "missing"))
    assert "\n" not in str(info.value)


def test_a_folder_resolves_to_its_highest_step(tmp_path, capsys):
    # What pretrain.py writes into a run folder: weights, their descriptions, predictions, training states.
    for name in ("step_9", "step_100", "step_100.config.yaml", "step_100_all_preds.0", "step_1000.config.yaml",
                 "all_config.yaml"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "train_state" / "step_2000").mkdir(parents=True)
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path / "step_100")  # by step number, not by name
    assert capsys.readouterr().out == f"Checkpoint: {tmp_path / 'step_100'} (the highest step of 2 in {tmp_path})\n"
    assert resolve_checkpoint(str(tmp_path), verbose=False) == str(tmp_path / "step_100")
    assert capsys.readouterr().out == ""


def test_a_folder_without_weights_is_refused_in_one_line(tmp_path):
    (tmp_path / "step_5.config.yaml").write_bytes(b"x")
    (tmp_path / "train_state").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        resolve_checkpoint(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert f"checkpoint folder {tmp_path} holds no step_<N> weights file (it holds: step_5.config.yaml, train_state)" \
        in message and "pass a step_<N> file" in message
    with pytest.raises(FileNotFoundError, match="it is empty"):
        resolve_checkpoint(str(tmp_path / "train_state"))


@pytest.mark.parametrize("spec", ["hf://", "hf://owner", "hf://owner/", "hf:///repo"])
def test_malformed_hf_spec(spec):
    with pytest.raises(ValueError, match="must look like hf://owner/repo"):
        resolve_checkpoint(spec)


def test_offline_cache(tmp_path):
    snapshot = cache_repo(tmp_path, "owner/repo", {"step_123": b"one", "README.md": b"card"})
    several = cache_repo(
        tmp_path, "owner/several",
        {"step_9": b"old", "ckpt/step_259320_arc_ag1_attn_type_h3l4": b"new", "step_32550_all_preds.0": b"x"},
    )
    cache_repo(tmp_path, "owner/nocheckpoint", {"README.md": b"card"})

    results = resolve(
        ["hf://owner/repo", "hf://owner/repo/step_123", "hf://owner/several", "hf://owner/several/step_9",
         "hf://owner/nocheckpoint", "hf://owner/repo/step_999", "hf://owner/uncached"],
        hub_env(tmp_path, offline=True),
    )

    repo_file = str(snapshot / "step_123")
    assert results[0] == {"path": repo_file} and results[1] == {"path": repo_file}
    with open(repo_file, "rb") as f:
        assert f.read() == b"one"
    assert results[2] == {"path": str(several / "ckpt" / "step_259320_arc_ag1_attn_type_h3l4")}
    assert results[3] == {"path": str(several / "step_9")}
    assert results[4]["error"] == "FileNotFoundError"
    assert "no checkpoint file named step_*" in results[4]["message"]
    # Offline, a file or repo missing from the cache cannot be told apart from one missing on the hub.
    assert_one_line_unreachable(results[5], "hf://owner/repo/step_999")
    assert_one_line_unreachable(results[6], "hf://owner/uncached")
    assert "HF_HUB_OFFLINE" in results[6]["message"]


def test_unreachable_hub(tmp_path):
    # The listing path and the download path, side by side (each retries its connection errors, without waits).
    env = hub_env(tmp_path, offline=False)
    listing = start_resolve(["hf://owner/repo"], env)
    download = start_resolve(["hf://owner/repo/step_1"], env)
    (list_result,), (download_result,) = finish_resolve(listing), finish_resolve(download)
    assert_one_line_unreachable(list_result, "hf://owner/repo")
    assert_one_line_unreachable(download_result, "hf://owner/repo/step_1")
    assert "Connect" in list_result["message"] and "Connect" in download_result["message"]
