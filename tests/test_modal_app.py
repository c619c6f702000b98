"""infra/modal_app.py without Modal's servers: the app imports, its entry points exist with the seed README's
parameters, the ARC job starts one process per GPU it gets, arch overrides travel on the command line, and the
functions underneath (eval job, realtime predict, pages) run locally on a tiny trained checkpoint."""

import inspect
import os

import numpy as np
import pytest
import torch

from infra import modal_app
from inference import recording, serving


def entry_point_parameters(name):
    """Parameter -> default of an entry point (what `modal run infra/modal_app.py::<name> --flag=value` accepts)."""
    return {p.name: p.default for p in inspect.signature(modal_app.RAW[name]).parameters.values()}


def test_entry_points_and_parameters():
    assert set(modal_app.ENTRY_POINTS) == {"download_weights_job", "run_eval_maze_job", "run_eval_sudoku_job",
                                           "run_eval_arc_job", "web"}
    # modal run infra/modal_app.py::run_eval_arc_job --dataset-path=data/arc1concept-aug-1000 --batch-size=512
    assert entry_point_parameters("run_eval_arc_job") == {
        "dataset_path": "data/arc1concept-aug-1000", "batch_size": 256, "one_batch": False, "checkpoint": ""}
    assert entry_point_parameters("run_eval_maze_job")["batch_size"] == 256
    assert entry_point_parameters("run_eval_sudoku_job")["model"] == "mlp"
    if modal_app.modal is not None:
        assert modal_app.app.name == "tinyrecursive-eval"
        for name in modal_app.ENTRY_POINTS:
            assert isinstance(getattr(modal_app, name), modal_app.modal.Function), name


def test_arc_job_runs_one_process_per_gpu_with_overrides_on_the_command_line():
    cmd = modal_app.eval_command("arc", outdir="/o", batch_size=512, gpus=modal_app.JOB_GPUS["run_eval_arc_job"])
    assert "--nproc-per-node=2" in cmd and modal_app.JOB_GPUS["run_eval_arc_job"] == 2
    assert cmd[cmd.index("--global-batch-size") + 1] == "512"
    assert cmd[-2:] == ["arch.H_cycles=3", "arch.L_cycles=4"]  # no config file is rewritten
    maze = modal_app.eval_command("maze", outdir="/o", one_batch=True)
    assert "torch.distributed.run" not in " ".join(maze) and "--one-batch" in maze
    sudoku = modal_app.eval_command("sudoku", model="mlp", outdir="/o")
    assert "arch.mlp_t=True" in sudoku
    with pytest.raises(ValueError, match="must divide"):
        modal_app.eval_command("arc", outdir="/o", batch_size=3)
    with pytest.raises(ValueError, match="'mlp' or 'attn'"):
        modal_app.eval_command("sudoku", model="big", outdir="/o")


def test_eval_job_and_realtime_predict_run_locally(trained_sudoku, tmp_path, monkeypatch):
    # The job's runner call on a local checkpoint, outputs under <root>/out/sudoku/mlp/<run>/ with a `latest` link.
    monkeypatch.setitem(modal_app.TASKS, "sudoku-mlp", {**modal_app.TASKS["sudoku-mlp"],
                                                         "overrides": trained_sudoku["overrides"] + ["device=cpu"]})
    result = modal_app.run_eval("sudoku", dataset_path=trained_sudoku["dataset"], checkpoint=trained_sudoku["checkpoint"],
                                batch_size=32, gpus=1, root=str(tmp_path))
    assert result["status"] == "ok" and result["result"] == 0
    latest = tmp_path / "out" / "sudoku" / "mlp" / "latest"
    assert os.path.realpath(latest) == os.path.realpath(result["output_dir"])
    mine = torch.load(latest / "step_0_all_preds.0", weights_only=True)
    runner = torch.load(os.path.join(trained_sudoku["outdir"], "step_0_all_preds.0"), weights_only=True)
    assert torch.equal(mine["preds"], runner["preds"])

    # Realtime predict: the same loader and validation as scripts/serve.py.
    monkeypatch.setitem(modal_app.TASKS, "sudoku-mlp", {"dataset": trained_sudoku["dataset"],
                                                         "weights": trained_sudoku["checkpoint"],
                                                         "overrides": trained_sudoku["overrides"], "gpus": 1})
    monkeypatch.setattr(modal_app, "_LOADED", {})
    inputs = np.load(os.path.join(trained_sudoku["dataset"], "test", "all__inputs.npy"))
    answer = modal_app.predict_realtime({"task": "sudoku", "model": "mlp",
                                         "grid": recording.tokens_to_grid("sudoku", inputs[3])})
    assert answer["prediction_tokens"] == runner["preds"][3].tolist() and len(answer["steps"]) == 3
    with pytest.raises(serving.RequestError) as err:
        modal_app.predict_realtime({"task": "sudoku", "grid": [[1]]})
    assert err.value.status == 400 and "9x9" in str(err.value)
    with pytest.raises(serving.RequestError) as err:
        modal_app.predict_realtime({"task": "chess", "grid": [[1]]})
    assert err.value.status == 400


def test_pages_are_served_from_the_repository():
    for name in ("sudoku_visualizer.html", "maze_visualizer.html", "arc_visualizer.html", "unified_visualizer.html"):
        assert "TRMViz.init" in modal_app.page_html(name)
    assert "const TRMViz" in modal_app.page_html("trm_viz.js")
    with pytest.raises(FileNotFoundError):
        modal_app.page_html("../requirements.txt")
