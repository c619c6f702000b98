"""scripts/serve.py over real HTTP on 127.0.0.1, against tiny Sudoku and maze checkpoints trained in the test
session: POST /predict runs the model through every ACT step and gives the eval runner's answer for the same
puzzle; GET /predict returns the runner's saved outputs; bad requests get a 4xx JSON message and the server keeps
serving. ARC identifier rules (never the blank 0, known to the checkpoint) on an in-process loaded model."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="fastapi is in requirements.txt: run scripts/setup_env.sh")
pytest.importorskip("uvicorn", reason="uvicorn is in requirements.txt: run scripts/setup_env.sh")

from inference import recording, serving  # noqa: E402

from tests.conftest import REPO, one_error_line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: dict, outputs=True):
    """A running scripts/serve.py on a free port: (process, base URL). Waits until /info answers."""
    port = free_port()
    cmd = [sys.executable, "scripts/serve.py", "--checkpoint", run["checkpoint"], "--dataset", run["dataset"],
           "--port", str(port), "--device", "cpu", *(["--outputs", run["outdir"]] if outputs else []), *run["overrides"]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):  # start-up: imports and the checkpoint load
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            urllib.request.urlopen(base + "/info", timeout=5).read()
            return proc, base
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve.py did not answer /info")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def request(base, path, body=None, raw=None, method=None):
    """(status, decoded JSON body) of one request; `raw` sends bytes as they are."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def sudoku_server(trained_sudoku):
    proc, base = start_server(trained_sudoku)
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def maze_server(trained_maze):
    proc, base = start_server(trained_maze)
    yield base
    stop(proc)


def _check_post_matches_runner(run, base, kind):
    saved = torch.load(os.path.join(run["outdir"], "step_0_all_preds.0"), weights_only=True)
    inputs = np.load(os.path.join(run["dataset"], "test", "all__inputs.npy"))
    for index in (0, 5):
        grid = recording.tokens_to_grid(kind, inputs[index])
        status, body = request(base, "/predict", {"task": kind, "grid": grid})
        assert status == 200, body
        assert body["task"] == kind and body["source"] == "model"
        assert body["prediction_tokens"] == saved["preds"][index].tolist()  # what run_eval_only.py saved
        assert body["prediction"] == recording.tokens_to_grid(kind, saved["preds"][index].numpy())
        assert body["input"] == grid
        assert [s["step"] for s in body["steps"]] == [1, 2, 3]
        assert body["steps"][-1]["prediction"] == body["prediction"]
        assert all(0 < s["q_halt"] < 1 for s in body["steps"])


def test_sudoku_post_matches_runner(trained_sudoku, sudoku_server):
    _check_post_matches_runner(trained_sudoku, sudoku_server, "sudoku")


def test_maze_post_matches_runner(trained_maze, maze_server):
    _check_post_matches_runner(trained_maze, maze_server, "maze")


def test_get_predict_serves_saved_outputs(trained_sudoku, sudoku_server):
    with open(os.path.join(trained_sudoku["outdir"], recording.VISUALIZER_JSON)) as f:
        doc = json.load(f)
    status, body = request(sudoku_server, "/predict?index=1")
    assert status == 200 and body["source"] == "saved"
    assert body["prediction"] == doc["examples"][1]["prediction"] and len(body["steps"]) == 3
    # A row that was not recorded step by step still comes back, from the saved predictions.
    saved = torch.load(os.path.join(trained_sudoku["outdir"], "step_0_all_preds.0"), weights_only=True)
    status, body = request(sudoku_server, "/predict?index=20")
    assert status == 200 and body["steps"] == []
    assert body["prediction_tokens"] == saved["preds"][20].tolist()
    status, body = request(sudoku_server, "/outputs")
    assert status == 200 and body == doc
    status, info = request(sudoku_server, "/info")
    assert info["task"] == "sudoku" and info["grid_size"] == [9, 9] and info["saved_examples"] == 32
    with urllib.request.urlopen(sudoku_server + "/sudoku_visualizer.html") as r:
        assert r.status == 200 and b"<html" in r.read().lower()


BAD_REQUESTS = [
    ("/predict", {"task": "sudoku", "grid": [[0] * 9] * 8}, None, 400, "must be 9x9"),
    ("/predict", {"task": "sudoku", "grid": [[11] * 9] * 9}, None, 400, "digits 0..9"),
    ("/predict", {"task": "sudoku", "grid": [[0.5] * 9] * 9}, None, 400, "integers only"),
    ("/predict", {"task": "maze", "grid": [[2] * 30] * 30}, None, 422, "runs a sudoku checkpoint"),
    ("/predict", {"task": "sudoku", "grid": [[0] * 9] * 9, "puzzle_identifier": 3}, None, 400, "no puzzle identifier"),
    ("/predict", {"task": "sudoku"}, None, 400, "no 'grid'"),
    ("/predict", [1, 2], None, 400, "JSON object"),
    ("/predict", None, b"{not json", 400, "not valid JSON"),
    ("/predict?index=99", None, None, 404, "out of range"),
    ("/predict?index=x", None, None, 400, "must be an integer"),
    ("/nope.html", None, None, 404, "no page"),
]


@pytest.mark.parametrize("path,body,raw,status,fragment", BAD_REQUESTS)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(sudoku_server, trained_sudoku, path, body, raw, status,
                                                           fragment):
    got, answer = request(sudoku_server, path, body, raw)
    assert got == status and fragment in answer["detail"], answer
    inputs = np.load(os.path.join(trained_sudoku["dataset"], "test", "all__inputs.npy"))
    ok, _ = request(sudoku_server, "/predict", {"grid": recording.tokens_to_grid("sudoku", inputs[0])})
    assert ok == 200


def test_server_refuses_a_checkpoint_of_another_task(trained_sudoku, trained_maze):
    cmd = [sys.executable, "scripts/serve.py", "--checkpoint", trained_sudoku["checkpoint"], "--dataset",
           trained_maze["dataset"], "--device", "cpu", *trained_sudoku["overrides"]]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    one_error_line(result.stderr, "vocabulary")


def test_arc_identifiers(tmp_path):
    """ARC requests need a trained puzzle identifier: never the blank 0, within the checkpoint's table."""
    from models.build import build_model
    from puzzle_dataset import load_metadata
    from training.config import compose_config

    data = tmp_path / "arc"
    (data / "test").mkdir(parents=True)
    meta = {"pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": 12, "seq_len": 900,
            "num_puzzle_identifiers": 3, "total_groups": 1, "mean_puzzle_examples": 1.0, "total_puzzles": 1,
            "sets": ["all"]}
    (data / "test" / "dataset.json").write_text(json.dumps(meta))
    for field, arr in (("inputs", np.zeros((1, 900), np.uint8)), ("labels", np.zeros((1, 900), np.uint8)),
                       ("puzzle_identifiers", np.array([1], np.int32)), ("puzzle_indices", np.array([0, 1], np.int32)),
                       ("group_indices", np.array([0, 1], np.int32))):
        np.save(data / "test" / f"all__{field}.npy", arr)
    (data / "identifiers.json").write_text(json.dumps(["<blank>", "abc|||t0|||0123456789", "def"]))
    overrides = ["arch.hidden_size=16", "arch.num_heads=2", "arch.expansion=2", "arch.L_layers=1", "arch.H_cycles=1",
                 "arch.L_cycles=1", "arch.halt_max_steps=2", "arch.puzzle_emb_ndim=16", "arch.puzzle_emb_len=1"]
    config = compose_config(serving.DEFAULT_CONFIG, overrides, fixed=dict(data_paths=[str(data)]))
    model = build_model(config.arch, load_metadata(str(data), "test"), batch_size=1, device=torch.device("cpu"))
    torch.save(model.state_dict(), tmp_path / "step_1")
    loaded = serving.load_for_inference(str(tmp_path / "step_1"), str(data), overrides, device="cpu")
    assert loaded.task == "arc"

    grid = [[1, 2], [3, 4]]
    for ident, status in ((None, 400), (0, 404), (3, 404), ("zzz", 404), (True, 400)):
        with pytest.raises(serving.RequestError) as err:
            serving.predict_grid(loaded, {"task": "arc", "grid": grid, **({} if ident is None else {"puzzle_identifier": ident})})
        assert err.value.status == status, (ident, str(err.value))
    for ident in (2, "def", "2"):
        answer = serving.predict_grid(loaded, {"task": "arc", "grid": grid, "puzzle_identifier": ident})
        assert answer["puzzle_identifier"] == 2 and answer["input"] == grid and len(answer["steps"]) == 2
