"""Exact resume from training-state checkpoints (training/train_state.py via pretrain.py): interrupted by SIGTERM or
SIGKILL, single process and under torchrun, a resumed run reproduces an uninterrupted one bit for bit (per-step
metrics, EMA weights files, live weights and optimizer moments). Also: corrupt checkpoints are skipped, a changed
config is refused, and micro-batching gives the same update as one batch.

Runs pretrain.py in subprocesses on a tiny Sudoku set (64 puzzles, 32 steps of batch 8) with EMA, a puzzle
embedding (sign-SGD) and ACT exploration. The runs start from weights whose halting head says "halt" (q_halt bias
+5), so which rows continue is decided by the exploration draws: the RNG state matters from the first step (from a
plain initialisation, q_halt stays negative in a short run and exploration never changes a decision)."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import ENV, REPO, launch, one_error_line

TOTAL_STEPS = 32  # 64 puzzles / batch 8 = 8 steps per epoch, 4 epochs
TIMEOUT = 300

TINY = ["evaluators=[]", "global_batch_size=8", "epochs=4", "eval_interval=2", "lr=1e-3", "puzzle_emb_lr=1e-2",
        "lr_warmup_steps=2", "ema=True", "arch.hidden_size=32", "arch.num_heads=2", "arch.L_layers=1",
        "arch.H_cycles=2", "arch.L_cycles=2", "arch.halt_max_steps=4", "arch.halt_exploration_prob=0.5",
        "arch.puzzle_emb_len=1", "++device=cpu", "++metrics_jsonl=true"]


@pytest.fixture(scope="module")
def data_dir(make_sudoku_dataset):
    return make_sudoku_dataset(64, 16, 30)


@pytest.fixture(scope="module")
def start_weights(data_dir, tmp_path_factory):
    """Weights file with an eager halting head, the start of every run."""

    from models.build import build_model
    from puzzle_dataset import load_metadata
    from training.checkpoint import save_model_state
    from training.config import compose_config

    config = compose_config(os.path.join(REPO, "config", "cfg_pretrain.yaml"), [f"data_paths=[{data_dir}]", *TINY])
    torch.manual_seed(0)
    model = build_model(config.arch, load_metadata(data_dir, "train"), batch_size=8, device=torch.device("cpu"))
    with torch.no_grad():
        model.model.inner.q_head.bias[0] = 5.0  # q_halt > 0: every row halts after one step unless exploring
    path = str(tmp_path_factory.mktemp("resume_weights") / "halting")
    save_model_state(model, path, compiled=False)
    return path


@pytest.fixture(scope="module")
def inputs(data_dir, start_weights):
    return data_dir, start_weights


def command(inputs, checkpoint_path, *extra, nproc=1):
    data_dir, start_weights = inputs
    return launch("pretrain.py", nproc) + [f"data_paths=[{data_dir}]", *TINY, f"++load_checkpoint={start_weights}",
                       f"++checkpoint_path={checkpoint_path}", *extra]


def run(cmd, expect_rc=0):
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == expect_rc, f"rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def train_lines(checkpoint_path):
    path = os.path.join(checkpoint_path, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum('"train/lm_loss"' in line for line in f)


def interrupt(cmd, ready, sig):
    """Start `cmd` in its own process group, wait until `ready()`, send `sig` to the group; return the process."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready():
            assert proc.poll() is None, f"run ended before the signal: {proc.communicate()}"
            assert time.monotonic() < deadline, "run made no progress"
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc


def state_steps(checkpoint_path):
    root = os.path.join(checkpoint_path, "train_state")
    return sorted(int(name[5:]) for name in os.listdir(root)
                  if os.path.isfile(os.path.join(root, name, "manifest.json")))


def metrics(checkpoint_path):
    with open(os.path.join(checkpoint_path, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "num_params" not in r]


def assert_same_tensors(a, b, what):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


def assert_same_run(run_dir, ref_dir):
    """Same per-step train and eval metrics, same EMA weights files, same final live weights, optimizer moments
    and EMA shadow: bit for bit."""
    got, want = metrics(run_dir), metrics(ref_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert got == want
    for name in ("step_16", f"step_{TOTAL_STEPS}"):
        load = lambda d: torch.load(os.path.join(d, name), map_location="cpu", weights_only=True)
        assert_same_tensors(load(run_dir), load(ref_dir), name)
    final = lambda d: torch.load(os.path.join(d, "train_state", f"step_{TOTAL_STEPS}", "shared.pt"), weights_only=True)
    assert_same_tensors(final(run_dir), final(ref_dir), "train state")


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """An uninterrupted run (no step checkpoints: they must not change the training)."""
    path = str(tmp_path_factory.mktemp("resume_ref") / "ref")
    run(command(inputs, path))
    assert train_lines(path) == TOTAL_STEPS
    return path


def test_sigterm_then_resume_is_exact(inputs, reference, tmp_path):
    path = str(tmp_path / "run")
    proc = interrupt(command(inputs, path), ready=lambda: train_lines(path) >= 6, sig=signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr_text[-3000:]
    assert "SIGTERM caught" in proc.stderr_text
    (stopped_at,) = state_steps(path)
    assert 6 <= stopped_at < TOTAL_STEPS  # the step it finished when the signal came, wherever that was

    out = run(command(inputs, path, "++resume=true"))
    assert f"Resumed from {os.path.join(path, 'train_state', f'step_{stopped_at}')} (step {stopped_at})" in out.stdout
    assert_same_run(path, reference)


def test_sigkill_after_a_checkpoint_then_resume_is_exact(inputs, reference, tmp_path):
    path = str(tmp_path / "run")
    ready = lambda: os.path.isfile(os.path.join(path, "train_state", "step_10", "manifest.json"))
    proc = interrupt(command(inputs, path, "checkpoint_every_steps=5"), ready=ready, sig=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert 10 <= train_lines(path) < TOTAL_STEPS
    resumed_at = max(state_steps(path))  # the newest complete checkpoint

    out = run(command(inputs, path, "checkpoint_every_steps=5", "++resume=true"))
    assert f"(step {resumed_at})" in out.stdout  # and the metrics logged past it were dropped
    assert_same_run(path, reference)
    assert state_steps(path) == [30, 32]  # keep_last_checkpoints=2


def test_truncated_checkpoint_is_skipped_and_other_config_refused(inputs, reference, tmp_path):
    path = str(tmp_path / "run")
    run(command(inputs, path, "checkpoint_every_steps=5", "keep_last_checkpoints=3"))
    assert state_steps(path) == [25, 30, 32]
    assert_same_run(path, reference)

    newest = os.path.join(path, "train_state", "step_32", "shared.pt")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    out = run(command(inputs, path, "checkpoint_every_steps=5", "++resume=true"))
    assert f"warning: skipping training state {os.path.dirname(newest)}: shared.pt has" in out.stderr
    assert "(truncated?)" in out.stderr
    assert "(step 30)" in out.stdout
    assert_same_run(path, reference)  # steps 31-32 replayed, step_32 rewritten

    out = run(command(inputs, path, "++resume=true", "arch.hidden_size=64", "global_batch_size=16"), expect_rc=2)
    error = one_error_line(out.stderr, "incompatible config: arch.hidden_size (checkpoint 32, now 64)",
                           "arch.puzzle_emb_ndim", "global_batch_size (checkpoint 8, now 16)", "total_steps")
    assert error.startswith("error: training state "), out.stderr


def test_resume_with_recompute_switched_on_is_exact(inputs, reference, tmp_path):
    """`+arch.recompute=True` changes how the step runs, not what it computes: a run that ran out of memory may
    resume with it, and on the CPU the result is bit for bit the uninterrupted run's."""
    path = str(tmp_path / "run")
    run(command(inputs, path, "checkpoint_every_steps=5"))
    shutil.rmtree(os.path.join(path, "train_state", "step_32"))
    out = run(command(inputs, path, "checkpoint_every_steps=5", "++resume=true", "+arch.recompute=True"))
    assert "(step 30)" in out.stdout
    assert_same_run(path, reference)


def test_torchrun_sigterm_then_resume_is_exact(inputs, tmp_path):
    ref, path = str(tmp_path / "ref"), str(tmp_path / "run")
    run(command(inputs, ref, nproc=2))
    # SIGTERM to torchrun: it forwards the signal to every worker's process group (as a scheduler would).
    interrupt(command(inputs, path, nproc=2), ready=lambda: train_lines(path) >= 6, sig=signal.SIGTERM)
    (stopped_at,) = state_steps(path)
    assert 6 <= stopped_at < TOTAL_STEPS
    folder = os.path.join(path, "train_state", f"step_{stopped_at}")
    assert sorted(os.listdir(folder)) == ["manifest.json", "rank_0.pt", "rank_1.pt", "shared.pt"]

    out = run(command(inputs, path, "++resume=true", nproc=2))
    assert f"(step {stopped_at})" in out.stdout
    assert_same_run(path, ref)


def test_micro_batches_give_the_same_update_as_one_batch(data_dir):
    """Global batch 8 in one forward vs 4 micro-batches of 2 (one ACT carry per slot, sparse grads accumulated):
    same metrics and, after 3 steps, the same weights and puzzle table within float tolerance. No exploration:
    its random draws are per forward, so they would differ between the two (by design, not an error).
    Sudoku puzzles all have identifier 0; here the rows get several, some shared across micro-batches, so the
    sign-SGD update must sum each identifier's gradient over the micro-batches."""
    from pretrain import create_train_state, train_batch
    from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
    from training.config import compose_config
    from utils.distributed import DistInfo

    dist_info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    overrides = [f"data_paths=[{data_dir}]", *TINY, "arch.halt_exploration_prob=0", "arch.halt_max_steps=2"]
    dataset = PuzzleDataset(PuzzleDatasetConfig(seed=0, dataset_paths=[data_dir], global_batch_size=8,
                                                test_set_mode=False, epochs_per_iter=1, rank=0, num_replicas=1))
    batches = [batch for _, (_, batch, _) in zip(range(3), dataset)]
    for batch in batches:
        batch["puzzle_identifiers"] = torch.tensor([1, 2, 3, 1, 4, 5, 2, 6], dtype=torch.int32)
    metadata = dataset.metadata.model_copy(update={"num_puzzle_identifiers": 7})

    results = {}
    for micro in ("null", "2"):
        config = compose_config(os.path.join(REPO, "config", "cfg_pretrain.yaml"),
                                overrides + [f"micro_batch_size={micro}"])
        torch.manual_seed(0)
        state = create_train_state(config, metadata, dist_info)
        assert len(state.carries) == (1 if micro == "null" else 4)
        step_metrics = [train_batch(config, state, batch, 8, dist_info) for batch in batches]
        results[micro] = step_metrics, {k: v.clone() for k, v in state.model.state_dict().items()}

    (metrics_one, weights_one), (metrics_micro, weights_micro) = results["null"], results["2"]
    for one, micro in zip(metrics_one, metrics_micro):
        assert one.keys() == micro.keys()
        for key in one:
            assert micro[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert weights_one.keys() == weights_micro.keys()
    for key in weights_one:
        torch.testing.assert_close(weights_micro[key], weights_one[key], rtol=1e-5, atol=1e-6, msg=key)
    # The rows of the identifiers used moved (sign-SGD), the others did not.
    moved = weights_one["model.inner.puzzle_emb.weights"].abs().sum(-1) > 0
    assert moved.tolist() == [False] + [True] * 6


def test_act_exploration_draws_from_its_seeded_generator(data_dir):
    """Exploration (probability 0.5, with a halting head that says "halt", so the draws decide the ACT steps) takes
    its draws from the training state's generator, seeded by (seed, rank): a train step leaves the global RNG as it
    was, the same seed gives the same steps, another seed other steps."""
    from pretrain import create_train_state, train_batch
    from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
    from training.checkpoint import unwrap
    from training.config import compose_config
    from training.train_state import act_generator
    from utils.distributed import DistInfo

    dist_info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    dataset = PuzzleDataset(PuzzleDatasetConfig(seed=0, dataset_paths=[data_dir], global_batch_size=8,
                                                test_set_mode=False, epochs_per_iter=1, rank=0, num_replicas=1))
    batches = [batch for _, (_, batch, _) in zip(range(4), dataset)]

    def train(seed):
        config = compose_config(os.path.join(REPO, "config", "cfg_pretrain.yaml"),
                                [f"data_paths=[{data_dir}]", *TINY, f"seed={seed}"])
        torch.manual_seed(0)  # the same initial weights for every seed
        state = create_train_state(config, dataset.metadata, dist_info)
        with torch.no_grad():
            unwrap(state.model).model.inner.q_head.bias[0] = 5.0
        global_rng = torch.get_rng_state()
        steps = [train_batch(config, state, batch, 8, dist_info)["train/steps"] for batch in batches]
        assert torch.equal(torch.get_rng_state(), global_rng)
        assert not torch.equal(state.act_generator.get_state(), act_generator(seed, 0, dist_info.device).get_state())
        return steps

    assert train(0) == train(0) != train(1)
    draws = {(seed, rank): torch.rand(16, generator=act_generator(seed, rank, torch.device("cpu"))).tolist()
             for seed, rank in ((0, 0), (0, 1), (1, 0))}
    assert len({tuple(d) for d in draws.values()}) == 3  # ranks and seeds explore independently
    assert torch.rand(16, generator=act_generator(0, 0, torch.device("cpu"))).tolist() == draws[(0, 0)]


# --- training/train_state.py pieces ----------------------------------------------------------------------------------

def _fake_checkpoint(root, step, complete=True):
    folder = os.path.join(root, "train_state", f"step_{step}")
    os.makedirs(folder)
    with open(os.path.join(folder, "shared.pt"), "wb") as f:
        f.write(b"x" * 10)
    if complete:
        from training.checkpoint import sha256_file as _sha256
        manifest = {"format": 1, "step": step, "files": {"shared.pt": {"bytes": 10, "sha256": _sha256(
            os.path.join(folder, "shared.pt"))}}}
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump(manifest, f)
    return folder


def test_prune_keeps_the_newest_complete_up_to_the_current_step(tmp_path):
    from training.train_state import prune
    for step, complete in ((5, True), (10, True), (15, True), (20, False), (25, True)):
        _fake_checkpoint(str(tmp_path), step, complete)
    prune(os.path.join(tmp_path, "train_state"), keep=2, current_step=20)
    # 20 is incomplete, 25 belongs to an abandoned future (this run resumed before it)
    assert state_steps(str(tmp_path)) == [10, 15]
    assert sorted(os.listdir(tmp_path / "train_state")) == ["step_10", "step_15"]


def test_find_latest_skips_incomplete_and_corrupt(tmp_path):
    from training.train_state import find_latest
    _fake_checkpoint(str(tmp_path), 5)
    corrupt = _fake_checkpoint(str(tmp_path), 10)
    with open(os.path.join(corrupt, "shared.pt"), "r+b") as f:
        f.write(b"y")  # same size, other bytes
    incomplete = _fake_checkpoint(str(tmp_path), 15, complete=False)
    warnings = []
    folder, manifest = find_latest(str(tmp_path), warn=warnings.append)
    assert manifest["step"] == 5 and folder.endswith("step_5")
    assert warnings == [
        f"warning: skipping training state {incomplete}: it has no manifest.json (the write did not finish); "
        "trying the previous one",
        f"warning: skipping training state {corrupt}: shared.pt does not match the sha256 in the manifest (corrupt); "
        "trying the previous one"]
    assert find_latest(str(tmp_path / "nothing"), warn=warnings.append) is None


def test_carry_round_trip():
    from models.recursive_reasoning.trm import InnerCarry, TRMCarry
    from training.train_state import carry_from_plain, carry_to_plain

    class Model(torch.nn.Module):  # initial_carry is all carry_from_plain needs
        def initial_carry(self, batch):
            n = batch["inputs"].shape[0]
            return TRMCarry(InnerCarry(torch.zeros(n, 3, 2), torch.zeros(n, 3, 2)), torch.zeros(n, dtype=torch.int32),
                            torch.ones(n, dtype=torch.bool), {k: torch.zeros_like(v) for k, v in batch.items()})

    carry = TRMCarry(InnerCarry(torch.randn(4, 3, 2), torch.randn(4, 3, 2)), torch.tensor([1, 0, 3, 2], dtype=torch.int32),
                     torch.tensor([False, True, False, False]),
                     {"inputs": torch.randint(0, 9, (4, 5), dtype=torch.int32),
                      "labels": torch.randint(0, 9, (4, 5), dtype=torch.int32)})
    back = carry_from_plain(carry_to_plain(carry), Model(), torch.device("cpu"))
    assert type(back) is TRMCarry and type(back.inner_carry) is InnerCarry
    assert_same_tensors(carry_to_plain(back), carry_to_plain(carry), "carry")
    assert carry_to_plain(None) is None and carry_from_plain(None, Model(), torch.device("cpu")) is None


def test_rewind_metrics_file_drops_later_steps_and_a_cut_line(tmp_path):
    from training.train_state import rewind_metrics_file
    lines = ['{"step": 0, "num_params": 5}\n', '{"step": 1, "train/lm_loss": 2.0}\n',
             '{"step": 2, "train/lm_loss": 1.0}\n', '{"step": 2, "all": {"accuracy": 0.5}}\n',
             '{"step": 3, "train/lm_loss": 0.5}\n', '{"step": 4, "train/l']
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    rewind_metrics_file(str(tmp_path), 2)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:4])
