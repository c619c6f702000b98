"""The Modal app: evaluation jobs on cloud GPUs, the visualizer pages and a realtime predict endpoint, as a thin
layer over the functions scripts/run_eval_only.py and scripts/serve.py use.

    modal run infra/modal_app.py::download_weights_job
    modal run infra/modal_app.py::run_eval_arc_job --dataset-path=data/arc1concept-aug-1000 --batch-size=512
    modal run infra/modal_app.py::run_eval_maze_job --batch-size=256
    modal run infra/modal_app.py::run_eval_sudoku_job --model=mlp
    modal deploy infra/modal_app.py          # pages + POST /predict (web endpoints)

Datasets and weights live on the volume `tinyrecursive-data` (mounted at /data). Each job runs the eval runner
with arch overrides on its command line (no shared config file is rewritten) and one process per GPU it was given.
Without the `modal` package the module still imports: the plain functions below run locally (tests call them)."""

import datetime
import os
import subprocess
import sys
from typing import Dict, List, Optional

REMOTE_REPO = "/root/trm"  # where the image holds this repository
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Locally this file sits in the repository; in a Modal container it is loaded on its own and the repository is
# the image's copy.
REPO_ROOT = _HERE if os.path.isfile(os.path.join(_HERE, "pretrain.py")) else REMOTE_REPO
sys.path.insert(0, REPO_ROOT)

APP_NAME = "tinyrecursive-eval"
VOLUME_NAME = "tinyrecursive-data"
VOLUME_DIR = os.environ.get("TRM_MODAL_DATA", "/data")  # the volume's mount point in the containers

# Per task: default dataset, published weights (the README's maze repo; the fork's Sudoku and ARC uploads), the arch
# overrides those checkpoints were trained with, GPUs of the job. --checkpoint replaces the weights.
TASKS: Dict[str, Dict] = {
    "maze": {"dataset": "data/maze-30x30-hard-1k", "weights": "hf://alphaXiv/trm-model-maze",
             "overrides": ["arch.L_cycles=4"], "gpus": 1},
    "sudoku-mlp": {"dataset": "data/sudoku-extreme-1k-aug-1000",
                   "weights": "hf://YuvrajSingh9886/sudoku-extreme-trm/step_32550_sudoku_epoch50k",
                   "overrides": ["arch.mlp_t=True", "arch.pos_encodings=none"], "gpus": 1},
    "sudoku-attn": {"dataset": "data/sudoku-extreme-1k-aug-1000",
                    "weights": "hf://YuvrajSingh9886/sudoku-extreme-trm/step_39060_sudoku_60k_epoch_attn_type",
                    "overrides": [], "gpus": 1},
    "arc": {"dataset": "data/arc1concept-aug-1000",
            "weights": "hf://YuvrajSingh9886/arc_agi_1_trm_model/step_259320_arc_ag1_attn_type_h3l4",
            "overrides": ["arch.H_cycles=3", "arch.L_cycles=4"], "gpus": 2},
}


def task_key(task: str, model: str = "mlp") -> str:
    if task == "sudoku":
        if model not in ("mlp", "attn"):
            raise ValueError(f"Sudoku model must be 'mlp' or 'attn', got {model!r}")
        return f"sudoku-{model}"
    if task not in TASKS:
        raise ValueError(f"task must be maze, sudoku or arc, got {task!r}")
    return task


def eval_command(task: str, *, dataset_path: Optional[str] = None, checkpoint: Optional[str] = None,
                 batch_size: int = 256, one_batch: bool = False, outdir: str, model: str = "mlp",
                 gpus: Optional[int] = None, python: str = sys.executable) -> List[str]:
    """The runner's command line for a job: one process per GPU of the job (torchrun only when more than one)."""
    spec = TASKS[task_key(task, model)]
    gpus = spec["gpus"] if gpus is None else gpus
    if batch_size % max(gpus, 1):
        raise ValueError(f"batch size {batch_size} must divide by the {gpus} GPUs of the job")
    launcher = [python] if gpus <= 1 else [python, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}",
                                            "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", "--nnodes=1"]
    # --eval-save-outputs takes a list: it must be followed by another flag, not by the trailing overrides.
    cmd = [*launcher, os.path.join(REPO_ROOT, "scripts", "run_eval_only.py"),
           "--eval-save-outputs", "inputs", "labels", "puzzle_identifiers", "preds",
           "--checkpoint", checkpoint or spec["weights"], "--dataset", dataset_path or spec["dataset"],
           "--outdir", outdir, "--global-batch-size", str(batch_size)]
    if one_batch:
        cmd.append("--one-batch")
    return cmd + list(spec["overrides"])


def run_eval(task: str, *, dataset_path: Optional[str] = None, checkpoint: Optional[str] = None,
             batch_size: int = 256, one_batch: bool = False, model: str = "mlp", gpus: Optional[int] = None,
             root: str = VOLUME_DIR) -> Dict:
    """Run the eval runner into `<root>/out/<task>/<model>/<timestamp>/` (relative dataset paths are under root)
    and point `<root>/out/<task>/<model>/latest` at it. Returns {status, output_dir, result (exit code), run_id}."""
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = os.path.join(root, "out", task, model if task == "sudoku" else ("attn" if task == "arc" else "default"))
    outdir = os.path.join(base, run_id)
    dataset = dataset_path or TASKS[task_key(task, model)]["dataset"]
    if not os.path.isabs(dataset):
        dataset = os.path.join(root, dataset)
    cmd = eval_command(task, dataset_path=dataset, checkpoint=checkpoint, batch_size=batch_size, one_batch=one_batch,
                       outdir=outdir, model=model, gpus=gpus)
    result = subprocess.run(cmd, cwd=REPO_ROOT).returncode
    if result == 0:
        from utils.atomic import atomic_path

        with atomic_path(os.path.join(base, "latest")) as tmp:  # readers see the old or the new run
            os.symlink(run_id, tmp)
    return {"status": "ok" if result == 0 else "failed", "output_dir": outdir, "result": result, "run_id": run_id}


def download_weights(tasks: Optional[List[str]] = None) -> Dict[str, str]:
    """Download each task's published checkpoint into the Hugging Face cache (on the volume when HF_HOME points
    there); returns task -> local file."""
    from utils.hub import resolve_checkpoint

    return {key: resolve_checkpoint(TASKS[key]["weights"]) for key in (tasks or list(TASKS))}


_LOADED: Dict[str, object] = {}


def predict_realtime(payload: Dict, root: str = VOLUME_DIR) -> Dict:
    """POST /predict of the deployed app: the model for the payload's task (loaded once per container), every ACT
    step of the posted grid. Errors are serving.RequestError with a 4xx status."""
    from inference import serving

    if not isinstance(payload, dict):
        raise serving.RequestError(400, "the request body must be a JSON object like {\"task\": \"sudoku\", \"grid\": [[...]]}")
    try:
        key = task_key(payload.get("task", "maze"), payload.get("model", "mlp"))
    except ValueError as e:
        raise serving.RequestError(400, str(e)) from None
    if key not in _LOADED:
        spec = TASKS[key]
        dataset = spec["dataset"] if os.path.isabs(spec["dataset"]) else os.path.join(root, spec["dataset"])
        _LOADED[key] = serving.load_for_inference(spec["weights"], dataset, spec["overrides"])
    return serving.predict_grid(_LOADED[key], {k: v for k, v in payload.items() if k != "model"})


def page_html(name: str) -> str:
    from inference.serving import PAGES, PAGES_DIR, SCRIPT

    if name not in PAGES + (SCRIPT,):
        raise FileNotFoundError(f"no page {name!r}")
    with open(os.path.join(PAGES_DIR, name)) as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------------------
# Entry points: each calls one function above. Plain functions here; wrapped as Modal functions below when the
# `modal` package is installed (the raw functions stay in RAW for local calls and tests).

_volume = None  # the Modal volume, when running under Modal


def _commit() -> None:
    if _volume is not None:
        _volume.commit()  # make the job's files visible to other containers


def download_weights_job(tasks: str = "maze,sudoku-mlp,sudoku-attn,arc") -> Dict[str, str]:
    files = download_weights([t for t in tasks.split(",") if t])
    _commit()
    return files


def run_eval_maze_job(batch_size: int = 256, one_batch: bool = False, checkpoint: str = "",
                      dataset_path: str = "") -> Dict:
    result = run_eval("maze", dataset_path=dataset_path or None, checkpoint=checkpoint or None,
                      batch_size=batch_size, one_batch=one_batch, gpus=JOB_GPUS["run_eval_maze_job"])
    _commit()
    return result


def run_eval_sudoku_job(model: str = "mlp", batch_size: int = 256, one_batch: bool = False, checkpoint: str = "",
                        dataset_path: str = "") -> Dict:
    result = run_eval("sudoku", model=model, dataset_path=dataset_path or None, checkpoint=checkpoint or None,
                      batch_size=batch_size, one_batch=one_batch, gpus=JOB_GPUS["run_eval_sudoku_job"])
    _commit()
    return result


def run_eval_arc_job(dataset_path: str = "data/arc1concept-aug-1000", batch_size: int = 256,
                     one_batch: bool = False, checkpoint: str = "") -> Dict:
    result = run_eval("arc", dataset_path=dataset_path, checkpoint=checkpoint or None, batch_size=batch_size,
                      one_batch=one_batch, gpus=JOB_GPUS["run_eval_arc_job"])  # one process per GPU of the job
    _commit()
    return result


def web_app():
    """The pages and POST /predict (realtime), with the local server's validation and error bodies."""
    import json

    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from inference import serving

    api = FastAPI(title="TRM visualizers")
    api.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])

    @api.exception_handler(serving.RequestError)
    async def request_error(_request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @api.post("/predict")
    async def predict(request: Request):
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise serving.RequestError(400, f"the request body is not valid JSON ({e})") from None
        return predict_realtime(payload)

    @api.get("/{name}")
    def page(name: str):
        try:
            text = page_html(name)
        except FileNotFoundError as e:
            raise serving.RequestError(404, str(e)) from None
        return Response(text, media_type="text/javascript") if name.endswith(".js") else HTMLResponse(text)

    return api


# GPUs per job: the ARC job's torchrun starts exactly as many processes as it has GPUs.
JOB_GPUS = {"download_weights_job": 0, "run_eval_maze_job": 1, "run_eval_sudoku_job": 1, "run_eval_arc_job": 2,
            "web": 1}
TIMEOUTS = {"download_weights_job": 2 * 3600, "run_eval_maze_job": 3600, "run_eval_sudoku_job": 3600,
            "run_eval_arc_job": 8 * 3600, "web": 3600}
RAW = {"download_weights_job": download_weights_job, "run_eval_maze_job": run_eval_maze_job,
       "run_eval_sudoku_job": run_eval_sudoku_job, "run_eval_arc_job": run_eval_arc_job, "web": web_app}
ENTRY_POINTS = tuple(RAW)

try:
    import modal
except ImportError:  # the plain functions above still work without it
    modal = None

if modal is not None:
    image = (modal.Image.debian_slim(python_version="3.11")
             .apt_install("git")
             .pip_install_from_requirements(os.path.join(REPO_ROOT, "requirements.txt"))
             .env({"HF_HOME": f"{VOLUME_DIR}/hf", "DISABLE_COMPILE": "1", "NCCL_NVLS_ENABLE": "0"})
             .add_local_dir(REPO_ROOT, REMOTE_REPO, ignore=[".venv", ".git", "data", "checkpoints", "wandb"]))
    app = modal.App(APP_NAME, image=image)
    _volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)

    def _options(name: str) -> Dict:
        gpus = JOB_GPUS[name]
        return {"volumes": {VOLUME_DIR: _volume}, "timeout": TIMEOUTS[name],
                **({"gpu": "A100" if gpus == 1 else f"A100:{gpus}"} if gpus else {})}

    download_weights_job = app.function(**_options("download_weights_job"))(download_weights_job)
    run_eval_maze_job = app.function(**_options("run_eval_maze_job"))(run_eval_maze_job)
    run_eval_sudoku_job = app.function(**_options("run_eval_sudoku_job"))(run_eval_sudoku_job)
    run_eval_arc_job = app.function(**_options("run_eval_arc_job"))(run_eval_arc_job)
    web = app.function(**_options("web"))(modal.concurrent(max_inputs=32)(modal.asgi_app()(web_app)))
