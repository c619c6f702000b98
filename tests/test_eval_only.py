"""The eval-only runner (scripts/run_eval_only.py, docs/compatibility.md section 10.2) end to end on builder-made
datasets: reported metrics, counts and Wilson intervals against a direct computation, checkpoint formats, --one-batch,
architecture overrides, refusals (one `error:` line, non-zero exit), ARC (submission.json, per-task credit),
--early-exit, and torchrun with 2 CPU processes.

The Sudoku checkpoint is a "copy" model: orthonormal token embeddings shared with the lm head, small residual
branches, so it predicts each given digit back and fails on blanks. Its test split has 0 or 1 blank per puzzle,
which makes exact accuracy neither 0 nor 1 and every metric worth checking."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from evaluators.arc import ARC
from models.build import build_model
from puzzle_dataset import load_metadata
from tests.conftest import (ENV, REPO, RUNNER, assert_refused, launch, read_eval_report,
                            run_eval_only_in_process)
from training.config import compose_config


# A tiny architecture, every field away from config/arch/trm.yaml so the overrides visibly take effect.
TINY = dict(hidden_size=32, num_heads=2, expansion=2, L_layers=1, H_cycles=2, L_cycles=2, halt_max_steps=3,
            puzzle_emb_len=2)
OVERRIDES = [f"arch.{k}={v}" for k, v in TINY.items()]
G = 4  # global batch
NUM_TEST = 12


def arch_config(arch="trm", **extra):
    """The arch the runner composes from config/arch/<arch>.yaml plus `arch.*` overrides."""
    overrides = [f"arch={arch}"] + [f"arch.{k}={v}" for k, v in {**TINY, **extra}.items()]
    return compose_config(os.path.join(REPO, "config", "cfg_pretrain.yaml"), overrides).arch


def tiny_model(metadata, arch="trm", seed=0, **extra):
    torch.manual_seed(seed)
    return build_model(arch_config(arch, **extra), metadata, batch_size=G, device=torch.device("cpu"))


def save_reference_format(model, path, prefix="_orig_mod."):
    """The reference's checkpoint: one torch.save of the loss head's raw state dict, compiled-model key prefix."""
    torch.save({prefix + k: v.clone() for k, v in model.state_dict().items()}, path)
    return str(path)


def make_copy_model(model, q_bias=-5.0):
    """Weights that copy each input token to the output (see the module docstring); q_halt ~= q_bias."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        inner = model.model.inner
        vocab, dim = inner.embed_tokens.embedding_weight.shape
        basis, _ = torch.linalg.qr(torch.randn(dim, vocab, generator=g))
        inner.embed_tokens.embedding_weight.copy_(4 * basis.T)
        inner.lm_head.weight.copy_(4 * basis.T)
        inner.H_init.zero_()
        inner.L_init.zero_()
        for name, p in inner.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.2)
        inner.q_head.weight.copy_(0.02 * torch.randn(inner.q_head.weight.shape, generator=g))
        inner.q_head.bias.fill_(q_bias)
    return model


def run_runner(args, env=None, timeout=300):
    proc = subprocess.run([sys.executable, RUNNER, *map(str, args)], env=env or ENV, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def wilson(p, n, z=1.96):
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, c - h), min(1.0, c + h)


# ---------------------------------------------------------------------------------------------------------------
# Datasets (built with the project's builders) and checkpoints


@pytest.fixture(scope="module")
def sudoku(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_sudoku")
    subprocess.run([sys.executable, "-m", "dataset.generate_sudoku", "--output-dir", root / "src", "--num-train", "2",
                    "--num-test", str(NUM_TEST), "--min-blanks", "0", "--max-blanks", "1", "--seed", "3",
                    "--workers", "1"], env=ENV, cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, "dataset/build_sudoku_dataset.py", "--source-dir", root / "src",
                    "--output-dir", root / "data"], env=ENV, cwd=REPO, check=True, capture_output=True)
    return str(root / "data")


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_maze") / "data"
    subprocess.run([sys.executable, "dataset/build_maze_dataset.py", "--source-dir", "tests/fixtures/maze_small",
                    "--output-dir", out], env=ENV, cwd=REPO, check=True, capture_output=True)
    return str(out)


@pytest.fixture(scope="module")
def copy_model(sudoku):
    return make_copy_model(tiny_model(load_metadata(sudoku, "test")))


@pytest.fixture(scope="module")
def copy_checkpoint(copy_model, tmp_path_factory):
    return save_reference_format(copy_model, tmp_path_factory.mktemp("ckpt") / "step_100")


@pytest.fixture(scope="module")
def baseline(sudoku, copy_checkpoint, tmp_path_factory):
    """The runner on the copy checkpoint, in a subprocess as a user runs it: (outdir, stdout)."""
    outdir = tmp_path_factory.mktemp("eval_out")
    rc, out, err = run_runner(["--checkpoint", copy_checkpoint, "--dataset", sudoku, "--outdir", outdir,
                               "--global-batch-size", G, *OVERRIDES])
    assert rc == 0, out + err
    return str(outdir), out


def load_test_split(path):
    split = os.path.join(path, "test")
    data = {k: np.load(os.path.join(split, f"all__{k}.npy"))
            for k in ("inputs", "labels", "puzzle_identifiers", "puzzle_indices")}
    # Puzzle identifier of every example row (puzzle p owns rows puzzle_indices[p]..puzzle_indices[p + 1]).
    row_puzzle = np.searchsorted(data["puzzle_indices"], np.arange(len(data["inputs"])), side="right") - 1
    data["row_identifiers"] = data["puzzle_identifiers"][row_puzzle]
    return data


def direct_eval(model, data):
    """The model run by hand on every test row (batches of G, fresh carry, halt_max_steps calls), metrics computed
    here from its logits: per-row sums as in docs/compatibility.md section 8."""
    model.eval()
    rows = []
    with torch.inference_mode():
        for start in range(0, len(data["inputs"]), G):
            labels = torch.tensor(data["labels"][start:start + G].astype(np.int64))
            labels[labels == 0] = -100  # ignore_label_id 0
            batch = {"inputs": torch.tensor(data["inputs"][start:start + G].astype(np.int32)),
                     "labels": labels.to(torch.int32),
                     "puzzle_identifiers": torch.tensor(data["row_identifiers"][start:start + G].astype(np.int32))}
            carry, calls = model.initial_carry(batch), 0
            while True:
                carry, _, _, outputs, halted = model(return_keys={"logits", "q_halt_logits"}, carry=carry, batch=batch)
                calls += 1
                if halted:
                    break
            logits = outputs["logits"].double()
            s = torch.where(logits >= 0, logits + 1, 1 / (1 - logits + 1e-30))  # stablemax
            log_p = torch.log(s / s.sum(-1, keepdim=True))
            mask = labels != -100
            nll = -log_p.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
            n = mask.sum(-1)
            correct = mask & (logits.argmax(-1) == labels)
            exact = correct.sum(-1) == n
            q = outputs["q_halt_logits"].double()
            for b in range(len(labels)):
                rows.append(dict(preds=logits[b].argmax(-1), exact=float(exact[b]), steps=calls,
                                 accuracy=float(correct[b].sum() / n[b]), lm_loss=float(nll[b].sum() / n[b]),
                                 q_halt_loss=float(torch.nn.functional.binary_cross_entropy_with_logits(
                                     q[b], exact[b].double())),
                                 q_halt_accuracy=float((q[b] >= 0) == exact[b]), tokens=int(n[b])))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 1. Reported numbers against a direct computation; both checkpoint key formats


def test_report_matches_direct_computation(sudoku, copy_model, copy_checkpoint, baseline):
    outdir, stdout = baseline
    report = read_eval_report(outdir)
    data = load_test_split(sudoku)
    rows = direct_eval(copy_model, data)

    # Predictions saved by the runner = the model run by hand; exact accuracy recomputed from them and the labels.
    saved = torch.load(os.path.join(outdir, "step_0_all_preds.0"), weights_only=True)
    assert sorted(saved) == ["inputs", "labels", "preds", "puzzle_identifiers"]
    assert torch.equal(saved["inputs"], torch.tensor(data["inputs"].astype(np.int32)))
    assert torch.equal(saved["preds"], torch.stack([r["preds"] for r in rows]))
    labels = saved["labels"]
    exact_from_file = ((saved["preds"] == labels) | (labels == -100)).all(-1).double().mean().item()

    metrics = report["metrics"]["all"]
    expected = {k: float(np.mean([r[k] for r in rows]))
                for k in ("accuracy", "lm_loss", "q_halt_accuracy", "q_halt_loss", "steps")}
    expected["exact_accuracy"] = float(np.mean([r["exact"] for r in rows]))
    assert 0 < expected["exact_accuracy"] < 1 and expected["accuracy"] > 0.95  # the copy model is as designed
    assert expected["steps"] == TINY["halt_max_steps"]
    assert metrics == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert metrics["exact_accuracy"] == pytest.approx(exact_from_file)
    assert report["eval_seconds"] > 0  # the loop's wall time, for throughput

    n_tokens = sum(r["tokens"] for r in rows)
    assert report["counts"] == {"all": {"count": NUM_TEST, "tokens": n_tokens}}
    for name, n in (("exact_accuracy", NUM_TEST), ("accuracy", n_tokens)):
        ci = report["wilson_95"][f"all.{name}"]
        assert ci["n"] == n and ci["p"] == metrics[name]
        lo, hi = wilson(metrics[name], n)
        assert (ci["lo"], ci["hi"]) == pytest.approx((lo, hi), abs=1e-4)  # z 1.96 vs 1.959964
        # One way of stating it: the measured value, then its interval and N (no midpoint that reads as a value).
        assert (f"  all.{name} {100 * metrics[name]:.2f}% (95% Wilson CI [{100 * ci['lo']:.2f}%, "
                f"{100 * ci['hi']:.2f}%], N={n})") in stdout.splitlines()
    assert "approx" not in stdout and "±" not in stdout

    assert report["checkpoint"] == copy_checkpoint and report["dataset"] == sudoku
    assert report["world_size"] == 1 and report["global_batch_size"] == G
    assert {k: report["arch"][k] for k in TINY} == TINY  # trailing arch.* overrides reached the model


def test_checkpoint_without_prefix_loads_identically(sudoku, copy_model, baseline, tmp_path, capsys):
    plain = save_reference_format(copy_model, tmp_path / "step_plain", prefix="")
    assert not any(k.startswith("_orig_mod.") for k in torch.load(plain, weights_only=True))
    rc, out, err = run_eval_only_in_process(["--checkpoint", plain, "--dataset", sudoku, "--outdir", tmp_path / "out",
                                   "--global-batch-size", G, *OVERRIDES], capsys)
    assert rc == 0, out + err
    ref = read_eval_report(baseline[0])
    got = read_eval_report(tmp_path / "out")
    assert got["metrics"] == ref["metrics"] and got["counts"] == ref["counts"]
    a = torch.load(os.path.join(baseline[0], "step_0_all_preds.0"), weights_only=True)
    b = torch.load(tmp_path / "out" / "step_0_all_preds.0", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_folder_evaluates_its_highest_step(sudoku, copy_checkpoint, baseline, tmp_path, capsys):
    # A training run's folder: step_<N> files beside their descriptions, predictions and training states.
    run = tmp_path / "run"
    (run / "train_state" / "step_100").mkdir(parents=True)
    shutil.copy(copy_checkpoint, run / "step_100")
    shutil.copy(save_reference_format(tiny_model(load_metadata(sudoku, "test"), seed=5), tmp_path / "other"),
                run / "step_9")  # lexically after step_100, an earlier step
    (run / "step_100_all_preds.0").write_bytes(b"not weights")
    rc, out, err = run_eval_only_in_process(["--checkpoint", run, "--dataset", sudoku, "--outdir", tmp_path / "out",
                                   "--global-batch-size", G, *OVERRIDES], capsys)
    assert rc == 0, out + err
    assert f"Checkpoint: {run / 'step_100'} (the highest step of 2 in {run})" in out.splitlines()
    report = read_eval_report(tmp_path / "out")
    assert report["checkpoint_file"] == str(run / "step_100")
    assert report["metrics"] == read_eval_report(baseline[0])["metrics"]

    (tmp_path / "empty_run" / "train_state").mkdir(parents=True)
    rc, out, err = run_eval_only_in_process(["--checkpoint", tmp_path / "empty_run", "--dataset", sudoku, "--outdir",
                                   tmp_path / "out2", *OVERRIDES], capsys)
    assert_refused(rc, err, "holds no step_<N> weights file (it holds: train_state)", "pass a step_<N> file")


def test_quick_start_states_the_result_as_the_runner_does(tmp_path):
    """scripts/quickstart.sh's last line gives the runner's line for all.exact_accuracy, unchanged."""
    with open(os.path.join(REPO, "scripts", "quickstart.sh")) as f:
        script = f.read()
    summary = script.split("<<'PYEOF'\n", 1)[1].split("\nPYEOF", 1)[0]
    ci = {"p": 0.858, "n": 1000, "lo": 0.8349, "hi": 0.8783}
    report = tmp_path / "eval_report.json"
    report.write_text(json.dumps({"wilson_95": {"all.exact_accuracy": ci}}))
    result = subprocess.run([sys.executable, "-", str(report), "45", "checkpoints/quickstart/step_1950"],
                            input=summary, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    from utils.stats import format_wilson_line
    runner_line = format_wilson_line("all.exact_accuracy", ci["p"], ci["lo"], ci["hi"], ci["n"]).strip()
    assert runner_line == "all.exact_accuracy 85.80% (95% Wilson CI [83.49%, 87.83%], N=1000)"
    assert result.stdout.startswith(f"Quick start: {runner_line}"), result.stdout
    assert result.stdout.count("%") == runner_line.count("%")  # no second figure for the same result


# ---------------------------------------------------------------------------------------------------------------
# 2. --one-batch


def test_one_batch(sudoku, copy_checkpoint, tmp_path, capsys):
    rc, out, err = run_eval_only_in_process(["--checkpoint", copy_checkpoint, "--dataset", sudoku, "--outdir", tmp_path,
                                   "--global-batch-size", G, "--one-batch", *OVERRIDES], capsys)
    assert rc == 0, out + err
    report = read_eval_report(tmp_path)
    assert report["one_batch"] is True
    assert report["counts"]["all"]["count"] == G
    assert set(report["metrics"]["all"]) == {"accuracy", "exact_accuracy", "lm_loss", "q_halt_accuracy",
                                             "q_halt_loss", "steps"}
    # The batch is the first one of the train sampler's first pass over the test split: Philox(seed + 1) orders
    # the groups (one single-example puzzle each for Sudoku), seed 0 in config/cfg_pretrain.yaml.
    order = np.random.Generator(np.random.Philox(seed=0 + 1)).permutation(NUM_TEST)
    saved = torch.load(tmp_path / "step_0_all_preds.0", weights_only=True)
    inputs = load_test_split(sudoku)["inputs"]
    assert torch.equal(saved["inputs"], torch.tensor(inputs[order[:G]].astype(np.int32)))


def test_one_batch_without_a_full_batch(sudoku, copy_checkpoint, tmp_path, capsys):
    rc, out, err = run_eval_only_in_process(["--checkpoint", copy_checkpoint, "--dataset", sudoku, "--outdir", tmp_path,
                                   "--global-batch-size", 2 * NUM_TEST, "--one-batch", *OVERRIDES], capsys)
    assert rc == 0 and "NO EVAL DATA FOUND" in out
    assert not os.path.exists(tmp_path / "eval_report.json")


# ---------------------------------------------------------------------------------------------------------------
# 3. Architecture overrides and refusals


def test_arch_is_settable_for_the_checkpoint(sudoku, tmp_path, capsys):
    model = tiny_model(load_metadata(sudoku, "test"), arch="trm_mlp", pos_encodings="none")
    ckpt = save_reference_format(model, tmp_path / "step_mlp")
    args = ["--checkpoint", ckpt, "--dataset", sudoku, "--global-batch-size", G, *OVERRIDES]

    rc, out, err = run_eval_only_in_process([*args, "--outdir", tmp_path / "mlp", "arch=trm_mlp", "arch.pos_encodings=none"],
                                  capsys)
    assert rc == 0, out + err
    report = read_eval_report(tmp_path / "mlp")
    assert report["arch"]["mlp_t"] is True and report["arch"]["L_cycles"] == TINY["L_cycles"]

    # Without naming the arch: the weights say MLP-T, and the same model is evaluated.
    rc, out, err = run_eval_only_in_process([*args, "--outdir", tmp_path / "auto"], capsys)
    assert rc == 0, out + err
    assert read_eval_report(tmp_path / "auto")["metrics"] == report["metrics"]
    # Asking for attention on MLP-T weights: refused, naming the setting.
    rc, out, err = run_eval_only_in_process([*args, "--outdir", tmp_path / "att", "arch.mlp_t=False"], capsys)
    assert_refused(rc, err, ckpt, "arch.mlp_t=False")


def test_refuses_a_checkpoint_of_another_task(sudoku, maze, tmp_path, capsys):
    ckpt = save_reference_format(tiny_model(load_metadata(maze, "test")), tmp_path / "step_maze")
    rc, out, err = run_eval_only_in_process(["--checkpoint", ckpt, "--dataset", sudoku, "--outdir", tmp_path / "out",
                                   "--global-batch-size", G, *OVERRIDES], capsys)
    assert_refused(rc, err, "embed_tokens", "[6, 32]", "[11, 32]", "vocabulary differs")
    assert "Traceback" not in out + err


@pytest.mark.parametrize("change,fragments", [
    (dict(seq_len=64), ("embed_pos", "[66, 32]", "[83, 32]", "sequence length differs")),
    (dict(num_puzzle_identifiers=5), ("puzzle-embedding table", "[5, 32]", "[1, 32]", "number of puzzle identifiers")),
], ids=["seq_len", "puzzle_table"])
def test_refuses_a_checkpoint_that_does_not_fit_the_dataset(sudoku, tmp_path, capsys, change, fragments):
    metadata = load_metadata(sudoku, "test").model_copy(update=change)
    ckpt = save_reference_format(tiny_model(metadata, pos_encodings="learned"), tmp_path / "step_other")
    rc, out, err = run_eval_only_in_process(["--checkpoint", ckpt, "--dataset", sudoku, "--outdir", tmp_path / "out",
                                   "--global-batch-size", G, *OVERRIDES, "arch.pos_encodings=learned"], capsys)
    assert_refused(rc, err, *fragments)


def test_refuses_a_checkpoint_of_another_width(sudoku, copy_checkpoint, tmp_path, capsys):
    # The usual slip: the checkpoint's arch overrides forgotten (here hidden_size).
    rc, out, err = run_eval_only_in_process(["--checkpoint", copy_checkpoint, "--dataset", sudoku, "--outdir", tmp_path,
                                   "--global-batch-size", G, *OVERRIDES, "arch.hidden_size=64"], capsys)
    assert_refused(rc, err, "[11, 32]", "arch.hidden_size=64", "width differs")


@pytest.mark.parametrize("override,fragments", [
    ("arch.L_cyclez=4", ("override rejected", "arch.L_cyclez")),
    ("arch=trm_mpl", ("override rejected", "trm_mpl")),
    ("arch.L_cycles=[", ("override rejected",)),
], ids=["unknown_key", "unknown_arch", "syntax"])
def test_refuses_a_bad_override(sudoku, copy_checkpoint, tmp_path, capsys, override, fragments):
    rc, out, err = run_eval_only_in_process(["--checkpoint", copy_checkpoint, "--dataset", sudoku, "--outdir", tmp_path,
                                   *OVERRIDES, override], capsys)
    assert_refused(rc, err, *fragments)


def test_dataset_path_is_not_override_syntax(sudoku, copy_checkpoint, tmp_path, capsys):
    dataset = tmp_path / "sudoku, v2=x"
    shutil.copytree(sudoku, dataset)
    rc, out, err = run_eval_only_in_process(["--checkpoint", copy_checkpoint, "--dataset", dataset, "--outdir", tmp_path / "out",
                                   "--global-batch-size", G, "--one-batch", *OVERRIDES], capsys)
    assert rc == 0, out + err
    assert read_eval_report(tmp_path / "out")["dataset"] == str(dataset)


class NotAStateDict:
    def __init__(self):
        self.weights = torch.zeros(2)


@pytest.mark.parametrize("obj,fragments", [
    (NotAStateDict(), ("not a plain state dict of tensors", "refused")),
    ({"model.inner.H_init": torch.zeros(32), "step": 7}, ("not a state dict", "'step' is of type int")),
    ([torch.zeros(2)], ("not a state dict", "list")),
], ids=["pickled_object", "dict_with_an_int", "list"])
def test_refuses_what_is_not_a_plain_state_dict(sudoku, tmp_path, capsys, obj, fragments):
    path = tmp_path / "step_1"
    torch.save(obj, path)
    rc, out, err = run_eval_only_in_process(["--checkpoint", path, "--dataset", sudoku, "--outdir", tmp_path / "out",
                                   "--global-batch-size", G, *OVERRIDES], capsys)
    assert_refused(rc, err, str(path), *fragments)


def test_refuses_a_missing_checkpoint(sudoku, tmp_path, capsys):
    rc, out, err = run_eval_only_in_process(["--checkpoint", tmp_path / "nope", "--dataset", sudoku, "--outdir", tmp_path,
                                   *OVERRIDES], capsys)
    assert_refused(rc, err, "nope", "does not exist")


def test_unreachable_hub_is_one_line(sudoku, tmp_path):
    # A subprocess, as users run it: exit code and stderr end to end. Offline mode with an empty cache (fast; without it huggingface_hub retries for ~25 s before the same error).
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_CACHE", None)
    rc, out, err = run_runner(["--checkpoint", "hf://alphaXiv/trm-model-maze", "--dataset", sudoku,
                               "--outdir", tmp_path / "out", *OVERRIDES], env=env)
    assert_refused(rc, err, "hf://alphaXiv/trm-model-maze", "could not reach the Hugging Face Hub")


# ---------------------------------------------------------------------------------------------------------------
# 4. ARC end to end


ARC_PUZZLES = {"training": 2, "evaluation": 3}  # first puzzles of each kaggle file


@pytest.fixture(scope="module")
def arc(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_arc")
    for subset, count in ARC_PUZZLES.items():
        for kind in ("challenges", "solutions"):
            with open(os.path.join(REPO, "kaggle", "combined", f"arc-agi_{subset}_{kind}.json")) as f:
                content = json.load(f)
            with open(root / f"arc-agi_{subset}_{kind}.json", "w") as f:
                json.dump(dict(list(content.items())[:count]), f)
    subprocess.run([sys.executable, "-m", "dataset.build_arc_dataset", "--input-file-prefix", root / "arc-agi",
                    "--output-dir", root / "data", "--subsets", *ARC_PUZZLES, "--test-set-name", "evaluation",
                    "--num-aug", "1"], env=ENV, cwd=REPO, check=True, capture_output=True)
    return str(root / "data")


def test_arc_end_to_end(arc, tmp_path):
    metadata = load_metadata(arc, "test")
    ckpt = save_reference_format(tiny_model(metadata), tmp_path / "step_arc")
    outdir = tmp_path / "out"
    rc, out, err = run_runner(["--checkpoint", ckpt, "--dataset", arc, "--outdir", outdir, "--global-batch-size", G,
                               *OVERRIDES])
    assert rc == 0, out + err

    with open(os.path.join(arc, "test_puzzles.json")) as f:
        test_puzzles = json.load(f)
    assert len(test_puzzles) == ARC_PUZZLES["evaluation"]
    num_pairs = sum(len(p["test"]) for p in test_puzzles.values())

    report = read_eval_report(outdir)
    metrics = report["metrics"]
    for k in (1, 2, 5, 10, 100, 1000):
        assert 0 <= metrics[f"ARC/pass@{k}"] <= 1
        ci = report["wilson_95"][f"ARC/example_pass@{k}"]
        assert ci["n"] == num_pairs and ci["p"] == metrics[f"ARC/example_pass@{k}"]
    assert metrics["ARC/example_N"] == num_pairs
    assert report["counts"]["all"]["count"] == metadata.total_puzzles == len(np.load(
        os.path.join(arc, "test", "all__inputs.npy")))  # one test input per augmented version here

    with open(outdir / "evaluator_ARC_step_0" / "submission.json") as f:
        submission = json.load(f)
    assert list(submission) == list(test_puzzles)
    for name, puzzle in test_puzzles.items():
        assert len(submission[name]) == len(puzzle["test"])
        for attempts in submission[name]:
            assert set(attempts) == {"attempt_1", "attempt_2"}

    per_task = report["per_task"]["ARC"]
    assert list(per_task) == list(test_puzzles)
    for k in (1, 2, 5, 10, 100, 1000):
        assert metrics[f"ARC/pass@{k}"] == pytest.approx(np.mean([t[f"pass@{k}"] for t in per_task.values()]))
    assert {name: t["pairs"] for name, t in per_task.items()} == {n: len(p["test"]) for n, p in test_puzzles.items()}


def test_arc_per_task_credit(tmp_path, monkeypatch):
    """per_task on the hand-made votes of tests/test_arc_evaluator.py, whose expected credits are worked out there."""
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
    import test_arc_evaluator as t

    root = tmp_path / "arc"
    root.mkdir()
    with open(root / "identifiers.json", "w") as f:
        json.dump(t.IDENTIFIERS, f)
    with open(root / "test_puzzles.json", "w") as f:
        json.dump(t.PUZZLES, f)
    evaluator = ARC(str(root), t.METADATA)
    t.feed(evaluator, t.make_rows(t.ROWS, num_blank=1))
    assert evaluator.result(None, rank=0, world_size=1) == pytest.approx(t.EXPECTED_METRICS)

    def credits(p1, p2, p5):
        return {"pass@1": p1, "pass@2": p2, **{f"pass@{k}": p5 for k in (5, 10, 100, 1000)}}

    assert evaluator.per_task == {
        t.B: {"pairs": 2, **credits(0.5, 0.5, 1.0)},
        t.A: {"pairs": 1, **credits(0.0, 1.0, 1.0)},
        t.C: {"pairs": 2, **credits(0.5, 0.5, 0.5)},
    }
    assert list(evaluator.per_task) == [t.B, t.A, t.C]
    evaluator.begin_eval()
    assert evaluator.per_task == {}


# ---------------------------------------------------------------------------------------------------------------
# 5. --early-exit


def test_early_exit_without_halting_matches_normal_mode(sudoku, copy_checkpoint, baseline, tmp_path, capsys):
    rc, out, err = run_eval_only_in_process(["--checkpoint", copy_checkpoint, "--dataset", sudoku, "--outdir", tmp_path,
                                   "--global-batch-size", G, "--early-exit", *OVERRIDES], capsys)
    assert rc == 0, out + err
    report, ref = read_eval_report(tmp_path), read_eval_report(baseline[0])
    assert report["early_exit"] is True
    assert report["metrics"] == ref["metrics"]  # q_halt ~ -5 never fires: all halt_max_steps steps
    assert report["metrics"]["all"]["steps"] == TINY["halt_max_steps"]
    a = torch.load(os.path.join(baseline[0], "step_0_all_preds.0"), weights_only=True)
    b = torch.load(tmp_path / "step_0_all_preds.0", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_exit_stops_when_every_row_halts(sudoku, copy_model, tmp_path, capsys):
    state = {k: v.clone() for k, v in copy_model.state_dict().items()}
    state["model.inner.q_head.bias"].fill_(5.0)  # q_halt ~ +5 on every row from the first step
    ckpt = tmp_path / "step_halting"
    torch.save({"_orig_mod." + k: v for k, v in state.items()}, ckpt)
    common = ["--checkpoint", ckpt, "--dataset", sudoku, "--global-batch-size", G, *OVERRIDES]

    rc, out, err = run_eval_only_in_process([*common, "--outdir", tmp_path / "early", "--early-exit"], capsys)
    assert rc == 0, out + err
    early = read_eval_report(tmp_path / "early")["metrics"]["all"]
    assert early["steps"] == 1.0

    rc, out, err = run_eval_only_in_process([*common, "--outdir", tmp_path / "normal"], capsys)  # opt-in only
    assert rc == 0, out + err
    normal = read_eval_report(tmp_path / "normal")["metrics"]["all"]
    assert normal["steps"] == TINY["halt_max_steps"]


def test_early_exit_scores_each_row_at_its_own_halting_step(sudoku, tmp_path, capsys):
    """With q_halt near 0 the rows halt at different steps. Each row must leave with the prediction of the first
    step its head said halt (the last step if never), whatever slot and batch it ran in: the same as running every
    row for all steps and reading that step (inference.recording's trace). Global batch 5 over 12 puzzles also
    makes the loader pad the last batch; padding rows must not be scored, saved or waited for."""
    from inference.recording import trace_act_steps
    from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig

    model = make_copy_model(tiny_model(load_metadata(sudoku, "test")), q_bias=0.0)
    whole = PuzzleDataset(PuzzleDatasetConfig(seed=0, dataset_paths=[sudoku], global_batch_size=NUM_TEST,
                                              test_set_mode=True, epochs_per_iter=1, rank=0, num_replicas=1), "test")
    (_, batch, _), = list(whole)
    # The bias only shifts q_halt: centre it on the median logit of the steps before the last.
    with torch.no_grad():
        model.model.inner.q_head.bias[0] = -trace_act_steps(model, batch)["q_halt_logits"][:-1].median()
    ckpt = save_reference_format(model, tmp_path / "step_7")
    trace = trace_act_steps(model, batch)
    halts = trace["q_halt_logits"] > 0  # [steps, rows]
    halts[-1] = True
    exit_step = halts.float().argmax(0)  # first step that says halt, per row
    rows = torch.arange(NUM_TEST)
    preds = trace["preds"][exit_step, rows]
    assert len(set(exit_step.tolist())) > 1, "the test needs rows that halt at different steps"

    rc, out, err = run_eval_only_in_process(["--checkpoint", ckpt, "--dataset", sudoku, "--outdir", tmp_path / "out",
                                             "--global-batch-size", 5, "--early-exit", *OVERRIDES], capsys)
    assert rc == 0, out + err
    report = read_eval_report(tmp_path / "out")
    metrics = report["metrics"]["all"]
    assert report["counts"]["all"] == {"count": NUM_TEST, "tokens": NUM_TEST * 81}
    assert metrics["steps"] == pytest.approx((exit_step + 1).float().mean().item())
    assert metrics["exact_accuracy"] == pytest.approx((preds == batch["labels"]).all(-1).float().mean().item())

    saved = torch.load(tmp_path / "out" / "step_0_all_preds.0", weights_only=True)
    assert len(saved["inputs"]) == NUM_TEST  # every puzzle once, no padding rows
    by_input = {tuple(x.tolist()): p for x, p in zip(saved["inputs"], saved["preds"])}
    assert len(by_input) == NUM_TEST
    for x, p in zip(batch["inputs"], preds):
        assert torch.equal(by_input[tuple(x.tolist())], p)


# ---------------------------------------------------------------------------------------------------------------
# 6. torchrun, 2 CPU processes


def test_torchrun_two_processes_match_one(sudoku, copy_checkpoint, baseline, tmp_path):
    cmd = launch(RUNNER, nproc=2) + ["--checkpoint", copy_checkpoint, "--dataset", sudoku, "--outdir", str(tmp_path), "--global-batch-size", str(G), "--device", "cpu", *OVERRIDES]
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    report, ref = read_eval_report(tmp_path), read_eval_report(baseline[0])
    assert report["world_size"] == 2
    assert report["counts"] == ref["counts"]
    assert report["metrics"]["all"] == pytest.approx(ref["metrics"]["all"], rel=1e-6)
    assert report["wilson_95"].keys() == ref["wilson_95"].keys()
    for name, ci in ref["wilson_95"].items():
        assert report["wilson_95"][name] == pytest.approx(ci, rel=1e-6)

    # Rank r holds rows [r * G/2, (r + 1) * G/2) of every window of G rows.
    single = torch.load(os.path.join(baseline[0], "step_0_all_preds.0"), weights_only=True)
    ranks = [torch.load(tmp_path / f"step_0_all_preds.{r}", weights_only=True) for r in (0, 1)]
    half = G // 2
    for key, value in single.items():
        merged = torch.cat([ranks[r][key][w * half:(w + 1) * half] for w in range(NUM_TEST // G) for r in (0, 1)])
        assert torch.equal(merged, value), key
