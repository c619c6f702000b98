"""The step-memory estimate (training/memory.py) against what the code really holds, and the start-up check built on
it: a config that cannot fit stops in one line naming a micro_batch_size that does, instead of being killed.

Measured on the CPU: the bytes autograd saves in one training forward (unique storages, through
saved_tensors_hooks) and the peak of live tensor bytes over model set-up and two real train steps
(torch.profiler's allocation records). The bfloat16 activations (the CUDA formula) are measured on the CPU too."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.profiler import ProfilerActivity, profile

import pretrain
from test_crash import group_alive, wait_group_gone
from dataset.common import PuzzleDatasetMetadata
from models.build import model_config_dict
from training import memory
from training.config import compose_config
from utils import distributed
from utils.errors import ConfigError
from utils.functions import load_model_class

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "config", "cfg_pretrain.yaml")
CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"), None)
SMALL = ["arch.hidden_size=64", "arch.num_heads=2", "arch.H_cycles=2", "arch.L_cycles=2", "arch.puzzle_emb_len=4"]
TINY_ARCH = ["arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.H_cycles=1", "arch.L_cycles=1",
             "arch.halt_max_steps=2", "arch.puzzle_emb_ndim=0", "arch.puzzle_emb_len=0"]
VARIANTS = {  # small configs of every architecture and block kind
    "attention": SMALL,
    "mlp_t": SMALL + ["arch.mlp_t=True", "arch.pos_encodings=none", "micro_batch_size=4"],
    "trm_singlez": ["arch=trm_singlez", *SMALL],
    "trm_hier6": ["arch=trm_hier6", *SMALL[:3], "arch.L_cycles=3", "arch.puzzle_emb_len=4"],
    "hrm": ["arch=hrm", "arch.hidden_size=64", "arch.num_heads=2", "arch.H_layers=2", "arch.L_layers=2"],
    # 6 heads of 10: the attention is narrower (60) than the hidden size
    "transformers_baseline": ["arch=transformers_baseline", "arch.hidden_size=64", "arch.num_heads=6",
                              "arch.H_layers=3"],
}


def compose(overrides, batch=8):
    return compose_config(CONFIG, overrides + ["data_paths=[synthetic]", "evaluators=[]", "device=cpu",
                                               f"global_batch_size={batch}"])


def metadata(seq_len=81, vocab=11, puzzles=2000):
    return PuzzleDatasetMetadata(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=vocab, seq_len=seq_len,
                                 num_puzzle_identifiers=puzzles, total_groups=10 ** 6, mean_puzzle_examples=1.0,
                                 total_puzzles=10 ** 6, sets=["all"])


def random_batch(md, rows, gen):
    return {"inputs": torch.randint(1, md.vocab_size, (rows, md.seq_len), generator=gen, dtype=torch.int32),
            "labels": torch.randint(2, md.vocab_size, (rows, md.seq_len), generator=gen, dtype=torch.int32),
            "puzzle_identifiers": torch.randint(0, md.num_puzzle_identifiers, (rows,), generator=gen,
                                                dtype=torch.int32)}


def saved_bytes(model, carry, batch) -> int:
    """Bytes of the distinct storages autograd saves in one forward of the loss head, weights and buffers aside."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        model(return_keys=(), carry=carry, batch=batch)
    return sum(saved.values())


def peak_live_bytes(prof) -> int:
    """Highest sum of allocated minus freed bytes over the profiled region, in the order the ops ran."""
    live = peak = 0
    for _start, delta in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
        live += delta
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_estimate_matches_saved_activations_and_measured_peak(variant):
    config, md = compose(VARIANTS[variant]), metadata()
    estimate = memory.estimate_step_memory(config, md, world_size=1, device_type="cpu", compiled=False)
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(md, config.global_batch_size, gen) for _ in range(3)]
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        state = pretrain.create_train_state(config, md, CPU)
        for batch in batches[:2]:  # the second step runs with the optimizer state and carries in place
            pretrain.train_batch(config, state, batch, config.global_batch_size, CPU)
    peak = peak_live_bytes(prof)
    mb = state.micro_batch_size
    saved = saved_bytes(state.model, state.carries[0], {k: v[:mb] for k, v in batches[2].items()})

    # The formula counts exactly what the code saves; the whole step within 15% of the measured peak.
    assert estimate.parts["activations"] == pytest.approx(saved, rel=0.05)
    assert estimate.parts["activations"] > 0.5 * peak  # the part that the test is about dominates
    assert estimate.tensors == pytest.approx(peak, rel=0.15)


@pytest.mark.parametrize("variant", ["attention", "mlp_t"])
def test_bfloat16_activations_match_formula(variant):
    """CUDA trains in bfloat16: the same count, with the fp32 norm inputs and the weights' bf16 copies."""
    config, md = compose(VARIANTS[variant]), metadata()
    estimate = memory.estimate_step_memory(config, md, world_size=1, device_type="cuda", compiled=False)
    mb = estimate.micro_batch_size
    cfg = model_config_dict(config.arch, md, batch_size=mb, device=torch.device("cuda"))  # no model on CUDA
    assert cfg["forward_dtype"] == "bfloat16"
    torch.manual_seed(0)
    model = load_model_class(config.arch.loss.name)(load_model_class(config.arch.name)(cfg),
                                                    **config.arch.loss.model_extra)
    model.train()
    batch = random_batch(md, mb, torch.Generator().manual_seed(0))
    assert estimate.parts["activations"] == pytest.approx(saved_bytes(model, model.initial_carry(batch), batch),
                                                          rel=0.05)


def test_compiled_cuda_estimates_match_measured_h200_peaks():
    """docs/performance.md's compiled bf16 peaks (paper architecture, synthetic data with one puzzle id)."""
    rows = [(81, 11, ["global_batch_size=768"], 19.81), (81, 11, ["global_batch_size=768", "arch.mlp_t=True",
            "arch.pos_encodings=none"], 29.62), (900, 6, ["global_batch_size=192", "arch.L_cycles=4"], 33.81),
            (900, 6, ["global_batch_size=768", "arch.L_cycles=4"], 134.7),
            (81, 11, ["global_batch_size=768", "+compile_memory_budget=0.65"], 15.07),
            (81, 11, ["global_batch_size=768", "+compile_memory_budget=0.5"], 10.64)]
    for seq_len, vocab, overrides, measured_gib in rows:
        config = compose_config(CONFIG, overrides + ["data_paths=[synthetic]", "evaluators=[]"])
        estimate = memory.estimate_step_memory(config, metadata(seq_len, vocab, puzzles=1), 1, "cuda", compiled=True)
        assert estimate.tensors / 2 ** 30 == pytest.approx(measured_gib, rel=0.05), overrides


# ----------------------------------------------------------------------------------------------------------------
# The check and its advice

# The paper's Sudoku MLP-T recipe (README), global batch 1536 on one CPU rank.
SUDOKU_MLP_T = ["arch.mlp_t=True", "arch.pos_encodings=none", "ema=True"]


def fitting_from_message(message: str) -> int:
    return int(message.split("micro_batch_size=")[1].split()[0])


def test_sudoku_mlp_t_recipe_is_refused_on_a_24_gib_cpu_with_a_micro_batch_that_fits(monkeypatch):
    config, md = compose(SUDOKU_MLP_T, batch=1536), metadata(puzzles=1)
    available = 24 * 2 ** 30
    monkeypatch.setenv(memory.AVAILABLE_OVERRIDE_ENV, str(available))
    with pytest.raises(ConfigError) as e:
        memory.check_fits(config, md, CPU, compiled=False)
    message = str(e.value)
    assert "\n" not in message and "24.0 GiB" in message and "check_memory=False" in message
    full = memory.estimate_step_memory(config, md, 1, "cpu", False)
    assert full.total > 4 * available and f"about {memory.gib(full.total)}" in message

    mb = fitting_from_message(message)
    assert 1536 % mb == 0
    def at(size):
        return memory.estimate_step_memory(config, md, 1, "cpu", False, micro_batch_size=size).total

    assert at(mb) <= memory.MARGIN * available
    larger = min(d for d in range(mb + 1, 1537) if 1536 % d == 0)  # the next valid size does not fit
    assert at(larger) > memory.MARGIN * available

    config.micro_batch_size = mb  # the advice followed: accepted
    memory.check_fits(config, md, CPU, compiled=False)
    config.micro_batch_size, config.check_memory = None, False  # and the check can be switched off
    memory.check_fits(config, md, CPU, compiled=False)


def test_no_micro_batch_fits_names_a_bigger_device(monkeypatch):
    config, md = compose(SUDOKU_MLP_T, batch=1536), metadata(puzzles=1)
    monkeypatch.setenv(memory.AVAILABLE_OVERRIDE_ENV, str(2 ** 20))
    with pytest.raises(ConfigError, match="not even micro_batch_size=1 fits"):
        memory.check_fits(config, md, CPU, compiled=False)


def test_out_of_memory_advice_names_the_total_and_a_smaller_micro_batch(monkeypatch):
    config, md = compose(SUDOKU_MLP_T, batch=1536), metadata(puzzles=1)
    total = 80 * 2 ** 30
    monkeypatch.setenv(memory.AVAILABLE_OVERRIDE_ENV, str(total))  # stands for the device's total memory
    line = memory.out_of_memory_advice(config, md, CPU, compiled=False, micro_batch_size=1536)
    assert "\n" not in line and line.startswith("out of memory in a training step") and "80.0 GiB in total" in line
    mb = fitting_from_message(line)
    assert 1536 % mb == 0 and mb < 1536
    assert memory.estimate_step_memory(config, md, 1, "cpu", False, micro_batch_size=mb).total <= memory.MARGIN * total
    # The estimate said the step fits, yet it ran out: the advice is still a smaller micro-batch.
    monkeypatch.setenv(memory.AVAILABLE_OVERRIDE_ENV, str(10 ** 15))
    config.micro_batch_size = 192
    assert fitting_from_message(memory.out_of_memory_advice(config, md, CPU, False, micro_batch_size=192)) == 128


def test_pretrain_ends_a_step_that_runs_out_of_memory_in_one_line(make_sudoku_dataset, tmp_path, monkeypatch, capsys):
    from hydra import compose as hydra_compose, initialize_config_dir

    from puzzle_dataset import stop_all_workers

    data = make_sudoku_dataset(64, 16, 30)
    with initialize_config_dir(config_dir=os.path.dirname(CONFIG), version_base=None):
        hydra_config = hydra_compose("cfg_pretrain", [f"data_paths=[{data}]", "evaluators=[]", "global_batch_size=8",
                                                      "epochs=2", "eval_interval=2", "device=cpu", *TINY_ARCH,
                                                      f"+checkpoint_path={tmp_path / 'run'}"])
    monkeypatch.setenv(memory.AVAILABLE_OVERRIDE_ENV, str(2 ** 30))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pretrain, "train_batch", out_of_memory)
    try:
        with pytest.raises(SystemExit) as e:
            pretrain.run(hydra_config)
    finally:
        stop_all_workers()
    assert e.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "out of memory in a training step" in errors[0] and "micro_batch_size=4 " in errors[0]
    assert err.endswith(errors[0] + "\n")  # the bar is closed first: the line is the last, and a line of its own


# ----------------------------------------------------------------------------------------------------------------
# pretrain.py: the refusal ends the run before anything is written, on every rank

@pytest.mark.parametrize("nproc", [1, 2])
def test_pretrain_refuses_a_config_that_does_not_fit(make_sudoku_dataset, tmp_path, nproc):
    data = make_sudoku_dataset(64, 16, 30)
    overrides = ["evaluators=[]", "global_batch_size=64", "epochs=2", "eval_interval=2", "device=cpu"]
    config = compose_config(CONFIG, overrides + [f"data_paths=[{data}]"])
    md = PuzzleDatasetMetadata.model_validate_json(open(os.path.join(data, "train", "dataset.json")).read())
    full = memory.estimate_step_memory(config, md, nproc, "cpu", False)
    available = full.total // 3  # the paper architecture at 64 rows does not fit; smaller micro-batches do
    fit = memory.fitting_micro_batch_size(config, md, nproc, "cpu", False, int(memory.MARGIN * available))

    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
        "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]
    checkpoint_path = tmp_path / "run"
    env = {**os.environ, memory.AVAILABLE_OVERRIDE_ENV: str(available)}
    env.pop("LOCAL_WORLD_SIZE", None)
    proc = subprocess.Popen(launcher + ["pretrain.py", f"data_paths=[{data}]", *overrides,
                                        f"+checkpoint_path={checkpoint_path}"],
                            cwd=REPO, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=120)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert proc.returncode != 0 and len(errors) == 1, err[-3000:]
        assert f"about {memory.gib(full.total)}" in errors[0]
        assert f"{memory.gib(available)} {memory.AVAILABLE_OVERRIDE_ENV}" in errors[0]
        assert f"micro_batch_size={fit.micro_batch_size} " in errors[0]
        if nproc == 1:  # torchrun adds its own report of the failed ranks
            assert err.strip().splitlines() == errors and out.strip() == ""
        assert not checkpoint_path.exists()
        assert wait_group_gone(proc.pid), "a process of the run (loader worker or rank) was left running"
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
