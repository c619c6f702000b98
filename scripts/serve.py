"""Local demo server: loads a checkpoint once and serves the visualizer pages and a prediction endpoint.

    python scripts/serve.py --checkpoint checkpoints/quickstart/step_1953 --dataset data/quickstart-sudoku \
        --outputs checkpoints/quickstart_eval --config config/cfg_quickstart.yaml
    # then open http://127.0.0.1:8000/sudoku_visualizer.html

GET /predict?index=i answers from the runner's saved outputs (--outputs, a scripts/run_eval_only.py --outdir);
POST /predict {"grid": [[...]], "task": ..., "puzzle_identifier": ... (ARC)} runs the model through every ACT step.
Bad requests get a 4xx JSON body {"detail": "..."}; trailing key=value arguments are Hydra overrides that set the
checkpoint's architecture, as for the eval runner."""

import argparse
import json
import os
import sys
from typing import List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from anywhere, as `python scripts/serve.py`

from inference import recording, serving  # noqa: E402
from inference.serving import PAGES, PAGES_DIR, SCRIPT  # noqa: E402
from utils.errors import InputError  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="step_<N> file, a run folder (its highest step_<N>), "
                                                      "or hf://owner/repo[/file]")
    p.add_argument("--dataset", required=True, help="the dataset the checkpoint belongs to (its test/ metadata and "
                                                     "identifiers.json fix the task and the puzzle table)")
    p.add_argument("--outputs", default=None, help="a scripts/run_eval_only.py --outdir for GET /predict")
    p.add_argument("--config", default=serving.DEFAULT_CONFIG, help="Hydra config file (default: config/cfg_pretrain.yaml)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. arch=trm_mlp arch.L_cycles=4")
    return p.parse_intermixed_args(argv)


def create_app(loaded: serving.ServingModel, outputs_dir: Optional[str] = None):
    """The FastAPI app over one loaded model (and, optionally, one folder of saved outputs)."""
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    app = FastAPI(title="TRM visualizer server")
    # Pages opened from disk (origin "null") call this server too.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    saved = {}

    def saved_outputs() -> serving.SavedOutputs:
        if outputs_dir is None:
            raise serving.RequestError(404, "this server has no saved outputs: start it with --outputs <run_eval_only --outdir>")
        if "outputs" not in saved:
            saved["outputs"] = serving.SavedOutputs(outputs_dir, loaded.task)
        return saved["outputs"]

    @app.exception_handler(serving.RequestError)
    async def request_error(_request, exc: serving.RequestError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected_error(_request, exc: Exception):
        # The server keeps serving; the message names what failed.
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index():
        links = "".join(f'<li><a href="/{name}">{name}</a></li>' for name in PAGES)
        return f"<!doctype html><title>TRM visualizers</title><h1>TRM visualizers ({loaded.task})</h1><ul>{links}</ul>"

    @app.get("/info")
    def info():
        return {"task": loaded.task, "grid_size": [recording.grid_side(loaded.metadata)] * 2,
                "checkpoint": loaded.checkpoint, "dataset": loaded.dataset, "device": str(loaded.device),
                "num_puzzle_identifiers": loaded.metadata.num_puzzle_identifiers,
                "saved_examples": len(saved_outputs()) if outputs_dir is not None else 0}

    @app.get("/outputs")
    def outputs():
        """The runner's visualizer.json (every recorded puzzle with its ACT steps)."""
        document = saved_outputs().document
        if document is None:
            raise serving.RequestError(404, f"{outputs_dir} has no {recording.VISUALIZER_JSON}: re-run scripts/run_eval_only.py")
        return document

    @app.get("/predict")
    def predict_saved(index: str = "0", task: Optional[str] = None):
        if task is not None and task != loaded.task:
            raise serving.RequestError(422, f"this server runs a {loaded.task} checkpoint; got task {task!r}")
        if not index.lstrip("-").isdigit():
            raise serving.RequestError(400, f"index must be an integer, got {index!r}")
        return saved_outputs().example(int(index))

    @app.post("/predict")
    async def predict_posted(request: Request):
        body = await request.body()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise serving.RequestError(400, f"the request body is not valid JSON ({e})") from None
        return serving.predict_grid(loaded, payload)

    @app.get("/{page}")
    def page(page: str):
        if page == SCRIPT:
            return FileResponse(os.path.join(PAGES_DIR, SCRIPT), media_type="text/javascript")
        if page not in PAGES:
            raise serving.RequestError(404, f"no page {page!r}; pages: {', '.join(PAGES)}")
        return FileResponse(os.path.join(PAGES_DIR, page), media_type="text/html")

    return app


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        loaded = serving.load_for_inference(args.checkpoint, args.dataset, args.overrides, device=args.device,
                                            config_file=args.config)
        if args.outputs is not None:
            serving.SavedOutputs(args.outputs, loaded.task)  # fail at start, not at the first request
    except (InputError, FileNotFoundError) as e:  # bad input: one line; anything else is a bug
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(loaded, args.outputs)
    print(f"Serving {loaded.task} checkpoint {args.checkpoint} on {loaded.device}: "
          f"http://{args.host}:{args.port}/{loaded.task}_visualizer.html", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
