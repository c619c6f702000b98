"""inference/model_loader.py: building a model from a checkpoint with no architecture on the command line.

Reference-format checkpoints are the fixtures in tests/fixtures (README there): weights as the reference saves
them, 64 wide, 2 blocks, puzzle prefix 2, 3 puzzle-embedding rows; `fixtures.json` holds their architecture and
`<name>.trace.pt` the reference's outputs on one batch."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from inference.model_loader import description_path, load_model_from_checkpoint, sha256_file
from puzzle_dataset import load_metadata
from tests.conftest import ENV, REPO, RUNNER, assert_refused, read_eval_report, run_eval_only_in_process
from training.checkpoint import CheckpointError

FIXTURES = os.path.join(REPO, "tests", "fixtures")
with open(os.path.join(FIXTURES, "fixtures.json")) as f:
    FIXTURE_SPECS = json.load(f)
INJECTED = {"batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers"}
# What the weights cannot tell: the cycle counts and the ACT steps.
UNSEEN = ("H_cycles", "L_cycles", "halt_max_steps")


def fixture_arch(name):
    return {k: v for k, v in FIXTURE_SPECS[name]["arch"].items() if k not in INJECTED}


def explicit_overrides(name, **change):
    return [f"arch.{k}={v}" for k, v in {**fixture_arch(name), **change}.items()]


@pytest.fixture(scope="module")
def sudoku3(make_sudoku_dataset, tmp_path_factory):
    """A Sudoku dataset whose table has the fixtures' 3 puzzle-identifier rows (its puzzles all use id 0)."""
    out = tmp_path_factory.mktemp("sudoku3") / "data"
    shutil.copytree(make_sudoku_dataset(2, 12, 0, 2), out)
    for split in ("train", "test"):
        path = out / split / "dataset.json"
        meta = json.loads(path.read_text())
        meta["num_puzzle_identifiers"] = 3
        path.write_text(json.dumps(meta))
    return str(out)


def place(name, folder, file_name="step_0"):
    os.makedirs(folder, exist_ok=True)
    return shutil.copy(os.path.join(FIXTURES, f"{name}.step_0"), os.path.join(folder, file_name))


def trace_logits(loaded, name):
    """Logits of the loaded model on the fixture batch after the reference's eval ACT steps."""
    trace = torch.load(os.path.join(FIXTURES, f"{name}.trace.pt"), weights_only=True)
    model, batch = loaded.model, trace["batch"]
    with torch.inference_mode():
        carry = model.initial_carry(batch)
        for _ in trace["eval_steps"]:
            carry, _, _, outputs, _ = model(return_keys={"logits"}, carry=carry, batch=batch)
    return outputs["logits"], trace["eval_steps"][-1]["logits"]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints without a saved config: the architecture is read from the weights


@pytest.mark.parametrize("name", ["trm_mlpt_small", "trm_att_small"])
def test_weights_determine_the_architecture(sudoku3, name, tmp_path, capsys):
    ckpt = place(name, tmp_path)
    cycles = {k: fixture_arch(name)[k] for k in UNSEEN}
    # Attention with rotary positions leaves no trace of num_heads or the puzzle prefix length either.
    extra = ({k: fixture_arch(name)[k] for k in ("num_heads", "puzzle_emb_len")} if name == "trm_att_small" else {})
    overrides = [f"arch.{k}={v}" for k, v in {**cycles, **extra}.items()] + ["arch.forward_dtype=float32"]
    loaded = load_model_from_checkpoint(ckpt, dataset_metadata=load_metadata(sudoku3, "test"), overrides=overrides,
                                        batch_size=8)
    want = fixture_arch(name)
    got = loaded.config.arch.model_dump()
    for key in ("hidden_size", "L_layers", "mlp_t", "puzzle_emb_ndim", "puzzle_emb_len", "expansion", *UNSEEN):
        assert got[key] == want[key], key
    assert (got["pos_encodings"] == "learned") == (want["pos_encodings"] == "learned")
    assert loaded.arch_source == "the weights"
    logits, reference = trace_logits(loaded, name)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    out = capsys.readouterr().out
    assert "Architecture (from the weights)" in out


def test_readme_eval_command_on_a_reference_mlpt_checkpoint(sudoku3, tmp_path):
    """The seed README's command, unchanged except the batch size: no arch overrides."""
    ckpt = place("trm_mlpt_small", tmp_path / "trained_models", "step_32550_sudoku_epoch50k")
    outdir = tmp_path / "out"
    proc = subprocess.run([sys.executable, RUNNER, "--checkpoint", ckpt, "--dataset", sudoku3, "--one-batch",
                           "--global-batch-size", "4", "--outdir", str(outdir)],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    arch = read_eval_report(outdir)["arch"]
    assert arch["mlp_t"] is True and arch["pos_encodings"] == "none"
    assert (arch["hidden_size"], arch["L_layers"], arch["puzzle_emb_len"]) == (64, 2, 2)
    assert read_eval_report(outdir)["metrics"]["all"]["steps"] == arch["halt_max_steps"]
    lines = proc.stdout.splitlines()
    assumed = [line for line in lines if line.startswith("Not determinable from the weights")]
    assert len(assumed) == 1 and all(f"{k}=" in assumed[0] for k in UNSEEN), proc.stdout
    assert sum(line.startswith("Architecture (from the weights)") for line in lines) == 1


def test_run_folder_all_config_sets_the_cycles(sudoku3, tmp_path, capsys):
    """A reference run folder (weights + all_config.yaml with L_cycles 4) evaluates at L_cycles 4, no override."""
    name = "trm_att_small"
    arch = {**fixture_arch(name), "L_cycles": 4, "name": "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1",
            "loss": {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"}}
    run_config = {"arch": arch, "data_paths": ["data/sudoku-extreme-1k-aug-1000"], "epochs": 50000,
                  "global_batch_size": 768, "lr": 1e-4, "seed": 0, "ema": True, "evaluators": []}
    folder = tmp_path / "Sudoku-extreme-1k-aug-1000-ACT-torch" / "TinyRecursiveReasoningModel_ACTV1 brisk-owl"
    ckpt = place(name, folder, "step_32550")
    (folder / "all_config.yaml").write_text(yaml.dump(run_config))  # PyYAML defaults, keys sorted, as written there
    common = ["--dataset", sudoku3, "--global-batch-size", 4, "--no-bf16"]

    rc, out, err = run_eval_only_in_process(["--checkpoint", ckpt, "--outdir", tmp_path / "auto", *common], capsys)
    assert rc == 0, out + err
    used = read_eval_report(tmp_path / "auto")["arch"]
    assert {k: used[k] for k in fixture_arch(name) if k != "forward_dtype"} == \
           {k: v for k, v in arch.items() if k in fixture_arch(name) and k != "forward_dtype"}
    assert used["L_cycles"] == 4
    assert f"Architecture (from {folder / 'all_config.yaml'})" in out

    # The same weights without the run folder, every setting given on the command line.
    bare = place(name, tmp_path / "bare", "step_32550")
    rc, out, err = run_eval_only_in_process(["--checkpoint", bare, "--outdir", tmp_path / "explicit", *common,
                                   *explicit_overrides(name, L_cycles=4, forward_dtype="float32")], capsys)
    assert rc == 0, out + err
    auto = torch.load(tmp_path / "auto" / "step_0_all_preds.0", weights_only=True)
    explicit = torch.load(tmp_path / "explicit" / "step_0_all_preds.0", weights_only=True)
    assert torch.equal(auto["preds"], explicit["preds"])
    assert read_eval_report(tmp_path / "auto")["metrics"] == read_eval_report(tmp_path / "explicit")["metrics"]

    # The cycle count matters for these weights: the default L_cycles 6 predicts otherwise.
    rc, out, err = run_eval_only_in_process(["--checkpoint", bare, "--outdir", tmp_path / "six", *common,
                                   *explicit_overrides(name, L_cycles=6, forward_dtype="float32")], capsys)
    assert rc == 0, out + err
    six = torch.load(tmp_path / "six" / "step_0_all_preds.0", weights_only=True)
    assert read_eval_report(tmp_path / "six")["metrics"] != read_eval_report(tmp_path / "auto")["metrics"] or \
        not torch.equal(six["preds"], auto["preds"])


# ---------------------------------------------------------------------------------------------------------------
# Overrides that contradict the weights


@pytest.mark.parametrize("override,fragments", [
    ("arch.hidden_size=32", ("arch.hidden_size=32", "width differs", "64")),
    ("arch.mlp_t=False", ("arch.mlp_t=False", "True")),
    ("arch.L_layers=3", ("arch.L_layers=3", "2")),
], ids=["hidden_size", "mlp_t", "L_layers"])
def test_an_override_that_contradicts_the_weights_is_refused(sudoku3, tmp_path, capsys, override, fragments):
    ckpt = place("trm_mlpt_small", tmp_path)
    rc, out, err = run_eval_only_in_process(["--checkpoint", ckpt, "--dataset", sudoku3, "--global-batch-size", 4,
                                   "--outdir", tmp_path / "out", override], capsys)
    assert_refused(rc, err, ckpt, "does not match the override", *fragments)
    with pytest.raises(CheckpointError, match="does not match the override"):
        load_model_from_checkpoint(ckpt, dataset_metadata=load_metadata(sudoku3, "test"), overrides=[override])


def test_loads_without_a_dataset(tmp_path):
    """A demo server has no dataset: MLP-T weights fix the sequence length (81 + prefix 2 = 83)."""
    loaded = load_model_from_checkpoint(place("trm_mlpt_small", tmp_path), verbose=False)
    assert (loaded.metadata.seq_len, loaded.metadata.vocab_size, loaded.metadata.num_puzzle_identifiers) == (81, 11, 3)
    assert not loaded.model.training


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints written by pretrain.py describe themselves

TRAIN_ARCH = {"hidden_size": 32, "num_heads": 2, "expansion": 2, "H_cycles": 2, "L_cycles": 3, "L_layers": 1,
              "halt_max_steps": 3, "halt_exploration_prob": 0, "puzzle_emb_ndim": 32, "puzzle_emb_len": 1}


@pytest.mark.parametrize("variant", ["attention", "mlp_t"])
def test_pretrain_checkpoint_evaluates_with_no_overrides(sudoku_dataset, tmp_path, capsys, variant):
    arch = dict(TRAIN_ARCH, **({"mlp_t": True, "pos_encodings": "none"} if variant == "mlp_t" else {}))
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "pretrain.py", f"data_paths=[{sudoku_dataset}]", "evaluators=[]",
                           f"+checkpoint_path={run_dir}", "global_batch_size=32", "epochs=1", "eval_interval=1",
                           "lr_warmup_steps=1", *[f"arch.{k}={v}" for k, v in arch.items()]],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [n for n in os.listdir(run_dir) if n.startswith("step_") and n[5:].isdigit()]
    assert len(steps) == 1
    weights = str(run_dir / steps[0])
    with open(description_path(weights)) as f:
        description = yaml.safe_load(f)
    assert {k: description["arch"][k] for k in arch} == arch
    assert description["data"]["seq_len"] == 81 and description["data"]["vocab_size"] == 11
    json_path = os.path.join(sudoku_dataset, "train", "dataset.json")
    assert description["data"]["dataset_json_sha256"] == {sudoku_dataset: sha256_file(json_path)}

    # The run folder's all_config.yaml is not what is read: the step file's own description wins.
    os.remove(run_dir / "all_config.yaml")
    rc, out, err = run_eval_only_in_process(["--checkpoint", weights, "--dataset", sudoku_dataset, "--global-batch-size", 8,
                                   "--outdir", tmp_path / "eval"], capsys)
    assert rc == 0, out + err
    used = read_eval_report(tmp_path / "eval")["arch"]
    assert {k: used[k] for k in arch} == arch
    assert f"Architecture (from {description_path(weights)})" in out
    assert "Not determinable" not in out
    np.testing.assert_equal(read_eval_report(tmp_path / "eval")["metrics"]["all"]["steps"], arch["halt_max_steps"])


@pytest.mark.parametrize("arch_name", ["trm", "trm_mlp", "trm_singlez", "trm_hier6", "hrm", "transformers_baseline"])
def test_every_arch_file_round_trips_through_its_description(sudoku_dataset, tmp_path, arch_name):
    """Weights + step_<N>.config.yaml as pretrain.py writes them rebuild the same model with no overrides."""
    from models.build import build_model
    from training.checkpoint import save_model_state
    from training.config import compose_config
    from inference.model_loader import DEFAULT_CONFIG_FILE, write_checkpoint_description

    fields = compose_config(DEFAULT_CONFIG_FILE, [f"arch={arch_name}"], fixed=dict(data_paths=[])).arch.model_dump()
    small = {"hidden_size": 32, "num_heads": 2, "expansion": 2, "H_layers": 1, "L_layers": 1, "H_cycles": 2,
             "L_cycles": 3, "halt_max_steps": 2, "puzzle_emb_len": 1}
    overrides = [f"arch={arch_name}"] + [f"arch.{k}={v}" for k, v in small.items() if k in fields]
    if fields.get("mlp_t"):
        overrides.append("arch.pos_encodings=none")
    config = compose_config(DEFAULT_CONFIG_FILE, overrides, fixed=dict(data_paths=[sudoku_dataset]))
    metadata = load_metadata(sudoku_dataset, "train")
    torch.manual_seed(0)
    model = build_model(config.arch, metadata, batch_size=4, device=torch.device("cpu"))
    weights = str(tmp_path / "step_7")
    save_model_state(model, weights, compiled=True)
    write_checkpoint_description(weights, config, metadata, step=7)

    loaded = load_model_from_checkpoint(weights, dataset_metadata=load_metadata(sudoku_dataset, "test"),
                                        batch_size=4, verbose=False)
    assert loaded.config.arch.model_dump() == config.arch.model_dump()
    assert loaded.arch_source == description_path(weights)
    saved = model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # Naming the arch file as well keeps the saved values (L_cycles 3, not the file's).
    named = load_model_from_checkpoint(weights, dataset_metadata=loaded.metadata, overrides=[f"arch={arch_name}"],
                                       batch_size=4, verbose=False)
    assert named.config.arch.model_dump() == config.arch.model_dump()
    # The weights alone, with this arch file named, load too (nothing in the file contradicts them).
    os.remove(description_path(weights))
    again = load_model_from_checkpoint(weights, dataset_metadata=loaded.metadata, overrides=overrides, batch_size=4,
                                       verbose=False)
    assert again.config.arch.model_dump() == config.arch.model_dump()


def test_fine_tuning_from_weights_of_another_width_is_one_line(sudoku_dataset, tmp_path):
    ckpt = place("trm_mlpt_small", tmp_path / "start")  # 64 wide
    proc = subprocess.run([sys.executable, "pretrain.py", f"data_paths=[{sudoku_dataset}]", "evaluators=[]",
                           f"+checkpoint_path={tmp_path / 'run'}", f"+load_checkpoint={ckpt}", "global_batch_size=32",
                           "epochs=1", "eval_interval=1", *[f"arch.{k}={v}" for k, v in TRAIN_ARCH.items()]],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert_refused(proc.returncode, proc.stderr, "load_checkpoint", "arch.hidden_size=32", "64 wide")
