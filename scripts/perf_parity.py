"""Device parity of the optimised paths (docs/performance.md): each computes the same function of the same weights.

    python scripts/perf_parity.py                      # CUDA, bf16, the paper architecture, batch 64
    python scripts/perf_parity.py --batch 4 --seq-len 9 arch.hidden_size=32 arch.num_heads=2   # CPU, float32: recompute only

Builds the model, optimizers and ACT generator as pretrain.py does (pretrain.create_train_state) once per path,
from the same weights, and runs `--steps` train steps of pretrain.train_batch on the same synthetic batches:

    eager                       compile=False
    eager_recompute             compile=False, +arch.recompute=True
    compiled                    compile=True (PyTorch's default mode)
    compiled_plain_kernels      compile=True, +arch.fused_kernels=False (the plain PyTorch SwiGLU and RoPE)
    compiled_reduce_overhead    compile=True, +compile_mode=reduce-overhead (CUDA graphs)
    compiled_memory_budget      compile=True, +compile_memory_budget=<--memory-budget>

On CUDA every path but compiled_plain_kernels runs the fused SwiGLU / RoPE kernels (arch.fused_kernels, on by
default), so compiled_plain_kernels against compiled is the kernels' parity.

Prints one JSON object: per path, against each reference (the compiled paths against `compiled` and `eager`,
recompute against `eager`), the max abs difference after the last step of the loss and every train metric (all
steps), the output state z_H / z_L, the logits (the step's z_H through the pre-update lm_head, computed eagerly),
every gradient, the AdamATan2 state, the sign-SGD puzzle embedding's row gradients and table, and every weight;
then `evaluation`: `--eval-steps` ACT steps of the eager path's trained model, compiled (pretrain.evaluation_model)
against eager: the fraction of equal preds and the max abs difference of the q_halt logits. Where the compiler
is off (CPU, env DISABLE_COMPILE), the compiled paths and the evaluation comparison are skipped with a note."""

import argparse
import itertools
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))

import torch  # noqa: E402
import torch._functorch.config as functorch_config  # noqa: E402

from benchmark import synthetic_batches, synthetic_metadata  # noqa: E402
from models.optimizers import AdamATan2  # noqa: E402
import pretrain  # noqa: E402
from training.checkpoint import unwrap  # noqa: E402
from training.config import compose_config  # noqa: E402
from utils import distributed  # noqa: E402


def path_overrides(memory_budget: float) -> dict:
    """Path name -> (its extra config overrides, whether it needs the compiler)."""
    return {
        "eager": (["compile=False"], False),
        "eager_recompute": (["compile=False", "+arch.recompute=True"], False),
        "compiled": (["compile=True"], True),
        "compiled_plain_kernels": (["compile=True", "+arch.fused_kernels=False"], True),
        "compiled_reduce_overhead": (["compile=True", "+compile_mode=reduce-overhead"], True),  # reuses compiled's kernels
        "compiled_memory_budget": (["compile=True", f"+compile_memory_budget={memory_budget}"], True),
    }  # in the order they run: the references first, the cheap ones early


REFERENCES = {"compiled": ["eager"], "compiled_plain_kernels": ["compiled", "eager"],
              "compiled_memory_budget": ["compiled", "eager"], "compiled_reduce_overhead": ["compiled", "eager"],
              "eager_recompute": ["eager"]}


def run_path(config, metadata, dist_info, weights, batches, steps: int) -> dict:
    """`steps` train steps of pretrain.train_batch from `weights`; what the last step produced and left behind."""
    torch.manual_seed(config.seed)
    state = pretrain.create_train_state(config, metadata, dist_info)
    state.total_steps = 10**9
    plain = unwrap(state.model)
    plain.load_state_dict(weights)
    names = {id(p): n for n, p in plain.named_parameters()}
    emb = plain.model.puzzle_emb
    seen = {}

    def before_update(opt, _args, _kwargs):
        # train_batch zeroes the gradients after each update: read them (and the step's outputs) just before.
        if "grads" not in seen:  # the first optimizer of the step: no weight has moved yet
            seen["grads"] = {}
            carry = state.carries[0]
            inner = plain.model.inner
            with torch.no_grad():
                seen["logits"] = inner.lm_head(carry.inner_carry.z_H)[:, inner.puzzle_emb_len:].clone()
            seen["z_H"], seen["z_L"] = carry.inner_carry.z_H.clone(), carry.inner_carry.z_L.clone()
        for group in opt.param_groups:
            for p in group["params"]:
                if p is emb.local_weights and p.grad is not None:
                    seen["puzzle_emb_grad"] = p.grad.clone()
                elif p.grad is not None:
                    seen["grads"][names[id(p)]] = p.grad.clone()

    for opt in state.optimizers:
        opt.register_step_pre_hook(before_update)
    metrics = []
    for _set, batch, global_batch_size in itertools.islice(batches, steps):
        seen.pop("grads", None)
        metrics.append(pretrain.train_batch(config, state, batch, global_batch_size, dist_info))
    dense = [o for o in state.optimizers if isinstance(o, AdamATan2)]
    adam = {}
    for opt in dense:
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    adam[f"{names[id(p)]}.{key}"] = value.clone()
    after = {k: v.clone() for k, v in plain.state_dict().items()}
    seen.update(metrics=metrics, adam_state=adam,
                puzzle_emb_table=after.pop("model.inner.puzzle_emb.weights", None), weights=after)
    return {"result": seen, "state": state}


def max_diff(a, b):
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def compare(a: dict, b: dict) -> dict:
    """Max abs differences of one path's results against a reference's (dict fields: the max and where)."""
    out = {}
    loss = lambda m: m["train/lm_loss"] + 0.5 * m["train/q_halt_loss"]
    out["loss"] = max(abs(loss(x) - loss(y)) for x, y in zip(a["metrics"], b["metrics"]))
    out["metrics"] = max(abs(x[k] - y[k]) for x, y in zip(a["metrics"], b["metrics"]) for k in x)
    for key in ("z_H", "z_L", "logits", "puzzle_emb_grad", "puzzle_emb_table"):
        if a.get(key) is not None:
            out[key] = max_diff(a[key], b[key])
    for key in ("grads", "adam_state", "weights"):
        if a[key].keys() != b[key].keys():
            raise RuntimeError(f"{key}: the paths differ in names: {sorted(a[key].keys() ^ b[key].keys())}")
        diffs = {name: max_diff(a[key][name], b[key][name]) for name in a[key]}
        worst = max(diffs, key=diffs.get)
        out[key], out[f"{key}_at"] = diffs[worst], worst
    return out


def act_steps(model, batch, n: int) -> list:
    model.eval()
    outputs = []
    with torch.inference_mode():
        carry = model.initial_carry(batch)
        for _ in range(n):
            carry, _loss, _metrics, out, _ = model(return_keys=("preds", "q_halt_logits"), carry=carry, batch=batch)
            outputs.append({k: v.clone() for k, v in out.items()})
    return outputs


def compare_evaluation(state, batch, n: int) -> dict:
    eager = act_steps(pretrain.evaluation_model(state, compile_eval=False), batch, n)
    compiled = act_steps(pretrain.evaluation_model(state, compile_eval=True), batch, n)
    equal = sum(int((a["preds"] == b["preds"]).sum()) for a, b in zip(eager, compiled))
    total = sum(a["preds"].numel() for a in eager)
    return {"act_steps": n, "preds_equal_fraction": equal / total,
            "q_halt_logits": max(max_diff(a["q_halt_logits"], b["q_halt_logits"]) for a, b in zip(eager, compiled))}


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO_ROOT, "config", "cfg_pretrain.yaml"))
    p.add_argument("--batch", type=int, default=64, help="global batch size")
    p.add_argument("--seq-len", type=int, default=81)
    p.add_argument("--vocab-size", type=int, default=11)
    p.add_argument("--puzzles", type=int, default=16, help="puzzle identifiers the batches draw from")
    p.add_argument("--steps", type=int, default=2, help="train steps per path (the last one is compared)")
    p.add_argument("--eval-steps", type=int, default=3, help="ACT steps of the evaluation comparison")
    p.add_argument("--memory-budget", type=float, default=0.5, help="compile_memory_budget of that path")
    p.add_argument("--paths", default=None, help="comma-separated subset of the paths (default: all)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. arch.mlp_t=True arch.pos_encodings=none")
    args = p.parse_args(argv)
    if min(args.batch, args.seq_len, args.steps, args.puzzles) < 1 or args.eval_steps < 0:
        p.error("--batch, --seq-len, --steps and --puzzles must be >= 1, --eval-steps >= 0")
    paths = path_overrides(args.memory_budget)
    chosen = list(paths) if args.paths is None else args.paths.split(",")
    unknown = [name for name in chosen if name not in paths]
    if unknown:
        p.error(f"unknown --paths {unknown}; choose from {list(paths)}")
    chosen = [name for name in paths if name in chosen or name == "eager"]  # eager: every comparison's reference

    start = time.perf_counter()
    # No warm-up: every compared step updates at the configured learning rates, not a 2000th of them.
    base = ["lr_warmup_steps=0"] + list(args.overrides) + ["data_paths=[synthetic]", "evaluators=[]", "+project_name=parity",
                                   "+run_name=parity", f"global_batch_size={args.batch}"]
    config = compose_config(args.config, base + ["compile=True"])
    dist_info = distributed.setup_distributed(config.device)
    metadata = synthetic_metadata(args.seq_len, args.vocab_size, args.puzzles)
    compiler = pretrain.compiles(config, dist_info)
    torch.manual_seed(config.seed)
    initial = pretrain.create_train_state(compose_config(args.config, base + paths["eager"][0]), metadata, dist_info)
    weights = {k: v.clone() for k, v in unwrap(initial.model).state_dict().items()}  # every path starts from these
    del initial
    result = {"device": torch.cuda.get_device_name() if dist_info.device.type == "cuda" else "cpu",
              "torch": torch.__version__, "forward_dtype": None, "global_batch_size": args.batch,
              "seq_len": args.seq_len, "steps": args.steps,
              "arch": {k: v for k, v in (config.arch.model_extra or {}).items()}}
    results, notes, eager_state = {}, {}, None
    for name in chosen:
        extra, needs_compiler = paths[name]
        if needs_compiler and not compiler:
            notes[name] = "skipped: the compiler is off here (CPU or env DISABLE_COMPILE)"
            continue
        path_config = compose_config(args.config, base + extra)
        torch._dynamo.reset()  # each compiled path compiles afresh, under its own settings
        budget = functorch_config.activation_memory_budget  # compile_model sets it process-wide
        try:
            run = run_path(path_config, metadata, dist_info, weights, synthetic_batches(metadata, args.batch, config.seed),
                           args.steps)
        finally:
            functorch_config.activation_memory_budget = budget
        results[name] = run["result"]
        if name == "eager":
            eager_state = run["state"]
            result["forward_dtype"] = str(results[name]["z_H"].dtype).removeprefix("torch.")
        del run
        if name in REFERENCES:
            result[name] = {f"vs_{ref}": compare(results[name], results[ref]) for ref in REFERENCES[name]
                            if ref in results}
        # Each path's numbers as soon as they exist, should a time limit stop the run before the JSON.
        log(f"{name}: {args.steps} train steps; {json.dumps(result.get(name, {}))}", start)
    result.update({name: {"note": note} for name, note in notes.items()})
    if not compiler:
        result["evaluation"] = {"note": "skipped: the compiler is off here (CPU or env DISABLE_COMPILE)"}
    elif args.eval_steps:
        torch._dynamo.reset()
        _set, batch, _ = next(synthetic_batches(metadata, args.batch, config.seed + 1))
        batch = {k: v.to(dist_info.device) for k, v in batch.items()}
        result["evaluation"] = compare_evaluation(eager_state, batch, args.eval_steps)
        log("evaluation compared", start)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    if dist_info.is_main:
        print(json.dumps(result))
    distributed.cleanup()
    return result


if __name__ == "__main__":
    main()
