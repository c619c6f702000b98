"""Peak memory of one training step, estimated from the config before anything is allocated, and the start-up check
that refuses a config the device cannot hold, naming a `micro_batch_size` that fits.

What a step holds at its peak (the start of the backward of the last micro-batch), in bytes. B = micro-batch rows,
S = seq_len + puzzle prefix positions, L = seq_len, D = hidden size, V = vocabulary, e = bytes of the forward dtype
(bfloat16: 2, float32: 4; the CPU trains in float32, models/build.py), n = heads, A = n * (D // n) the attention
width, I = the SwiGLU width (models/layers.swiglu_intermediate_size(D)), I_t = that of MLP-T's SwiGLU over the S
positions, P_w = the fp32 parameters, N x d = the puzzle table:

- weights 4 P_w (+ buffers), gradients 4 P_w, AdamATan2's two moments 8 P_w; with ema=True the shadow 4 P_w and
  the evaluation copy (4 P_w + the buffers, the puzzle table among them) that pretrain.py keeps after its first
  evaluation;
- the puzzle table 4 N d, its per-micro-batch rows with their gradient 2 * 4 B d, and with several micro-batches
  the gradients of the earlier ones (models/sparse_embedding.py keeps them until the optimizer step);
- the ACT carries of all micro-batch slots: (latent states) x rows x S x D x e, plus their current puzzles;
- activations: the tensors autograd saves in the one gradient H cycle (the H_cycles - 1 cycles before it run
  without grad and keep nothing). Per block call, per row, counted from what the code saves (unique storages,
  measured with torch.autograd.graph.saved_tensors_hooks in tests/test_memory.py):
    attention  S * (e * (2D + 4A + 2A [rope only: the rotated q, k] + 4I) + 4 * (2D + 2 + n))
               = the block input, qkv, attention output, normed input of the SwiGLU, its gate/up, silu and
                 product (e each), the two fp32 norm inputs, the norms' rsqrt and the attention log-sum-exp;
    MLP-T      S * (e * (2D + 4I) + 4 * (2D + 1)) + D * (e * 4 I_t + 4)
               = the transposed input and normed output copies that the linears save, the SwiGLUs' gate/up,
                 silu and product over positions (I_t) and over channels (I), the fp32 norm inputs, the rsqrts;
  plus, when e is not 4, each block weight cast to the forward dtype (e bytes per weight per call). Block calls
  with gradients per ACT step: TRM and its single-z and multi-scale variants (L_cycles + 1) x L_layers, HRM
  L_layers + H_layers, the transformer baseline H_layers. With arch.recompute each call keeps only its input
  (B S D e) and one block's activations are rebuilt at a time in backward. The heads add the answer state
  (B S D e), the logits (B S V e) and the float64 loss terms (B L V (4 * 8 + 1));
- working set: the reset and the new carry's latents and the fp32 gradients at the start of backward,
  B S (e D (latent states + new latents) + 4 * 2D); a model that runs a second, no-grad inner pass for the
  Q-continue target (HRM, arch.no_ACT_continue=False) does it while the graph is alive: + B S e 4I;
- runtime: what a process takes beyond its tensors (RUNTIME_BYTES).

Checked: the activations equal the bytes saved_tensors_hooks counts (within 0.1%), and the whole within a few per
cent of the CPU's measured peak of live tensors, for each architecture (tests/test_memory.py). Compiled on CUDA,
Inductor's partitioner saves fewer tensors (it recomputes elementwise work in backward instead): the activations
are then scaled by COMPILED_ACTIVATION_FACTOR, the ratio of the compiled bf16 peaks measured on an H200 to this
formula's eager count (docs/performance.md, "Memory estimate"), and by COMPILE_BUDGET_KEPT under
compile_memory_budget."""

import os
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

import torch

from dataset.common import PuzzleDatasetMetadata
from models.build import model_config_dict
from models.layers import swiglu_intermediate_size
from models.recursive_reasoning import hrm, transformers_baseline, trm, trm_hier6, trm_singlez
from training.config import PretrainConfig
from utils import distributed
from utils.errors import ConfigError
from utils.functions import load_model_class

GIB = 2 ** 30
MARGIN = 0.9  # a suggested micro_batch_size must fit in this fraction of the available memory
# Compiled / eager activation bytes on CUDA (bf16), per token mixer: docs/performance.md, "Memory estimate"
# (attention 0.79 at Sudoku 768 and Maze 192 and 768, MLP-T 0.74 at Sudoku 768). Not with arch.recompute, whose
# saved block inputs compilation does not shrink.
COMPILED_ACTIVATION_FACTOR = {"attention": 0.79, "mlp_t": 0.74}
# compile_memory_budget b -> share of the compiled activations kept, measured at Sudoku attention 768 (same page):
# b = 0.65 keeps 0.75, 0.5 keeps 0.52; linear between, proportional below 0.5.
COMPILE_BUDGET_KEPT = ((0.5, 0.52), (0.65, 0.75), (1.0, 1.0))
# A process's memory beyond its tensors' bytes. CPU: the allocator's and kernel libraries' own, measured as the
# RSS growth of CPU steps beyond their tensors (0.13-0.23 GiB for steps of 0.3-1.5 GiB); CUDA: cuBLAS/cuDNN
# workspaces and the caching allocator's rounding (torch.cuda.max_memory_allocated does not count them).
RUNTIME_BYTES = {"cpu": 200 * 2 ** 20, "cuda": 512 * 2 ** 20}
AVAILABLE_OVERRIDE_ENV = "TRM_MEMORY_AVAILABLE_BYTES"  # for tests: pretend the device has this much free memory


@dataclass
class MemoryEstimate:
    micro_batch_size: int
    parts: Dict[str, int] = field(default_factory=dict)  # bytes per part (names as in the module docstring)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def tensors(self) -> int:
        """The tensors' bytes alone: what torch.cuda.max_memory_allocated measures."""
        return self.total - self.parts.get("runtime", 0)


@dataclass(frozen=True)
class Recursion:
    """What one training ACT step of a model class runs, for the count of saved activations."""
    grad_block_calls: int  # block calls with gradients
    latent_states: int  # [B, S, D] tensors in the carry
    new_latents: int  # of those, the ones the new carry holds besides the (saved) answer state
    second_pass: bool = False  # a no-grad inner pass for the Q-continue target, after the gradient one


def recursion_of(inner: torch.nn.Module, cfg) -> Optional[Recursion]:
    """None for a model class this module does not know."""
    if isinstance(inner, transformers_baseline.BaselineInner):
        return Recursion(cfg.H_layers, 1, 0)
    if isinstance(inner, hrm.HRMInner):
        return Recursion(cfg.L_layers + cfg.H_layers, 2, 1)
    if isinstance(inner, trm_hier6.Hier6Inner):
        return Recursion((cfg.L_cycles + 1) * cfg.L_layers, 1 + trm_hier6.NUM_SLOTS, trm_hier6.NUM_SLOTS)
    if isinstance(inner, trm_singlez.SingleZInner):
        return Recursion((cfg.L_cycles + 1) * cfg.L_layers, 1, 0)
    if type(inner) is trm.TRMInner:
        return Recursion((cfg.L_cycles + 1) * cfg.L_layers, 2, 1)
    return None


def block_activation_bytes(cfg, rows: int) -> int:
    """Bytes autograd saves in one eager block call over `rows` rows (the module docstring's formula)."""
    S, D, e = cfg.seq_len + cfg.prefix_len, cfg.hidden_size, cfg.dtype.itemsize
    inter = swiglu_intermediate_size(D, cfg.expansion)
    if cfg.mlp_t:
        inter_t = swiglu_intermediate_size(S, cfg.expansion)
        per_row = S * (e * (2 * D + 4 * inter) + 4 * (2 * D + 1)) + D * (e * 4 * inter_t + 4)
    else:
        n = cfg.num_heads
        A = n * (D // n)
        rope = 2 * A if cfg.pos_encodings == "rope" else 0
        per_row = S * (e * (2 * D + 4 * A + rope + 4 * inter) + 4 * (2 * D + 2 + n))
    return rows * per_row


def compile_budget_kept(budget: Optional[float]) -> float:
    """Share of the compiled activations kept under compile_memory_budget (COMPILE_BUDGET_KEPT)."""
    if budget is None:
        return 1.0
    (b0, k0), *rest = COMPILE_BUDGET_KEPT
    if budget <= b0:
        return k0 * budget / b0
    for b1, k1 in rest:
        if budget <= b1:
            return k0 + (k1 - k0) * (budget - b0) / (b1 - b0)
        b0, k0 = b1, k1
    return 1.0


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_step_memory(config: PretrainConfig, metadata: PuzzleDatasetMetadata, world_size: int,
                         device_type: str, compiled: bool, micro_batch_size: Optional[int] = None
                         ) -> Optional[MemoryEstimate]:
    """Peak bytes of one training step on one rank, or None for a model class without a formula here.
    `micro_batch_size` None: the config's (None there too: the whole per-rank batch)."""
    local_batch = config.global_batch_size // world_size
    mb = micro_batch_size or config.micro_batch_size or local_batch
    slots = local_batch // mb
    with torch.device("meta"):  # shapes only: nothing is allocated, the puzzle table neither
        model = load_model_class(config.arch.name)(
            model_config_dict(config.arch, metadata, batch_size=mb, device=torch.device(device_type)))
    cfg, inner = model.config, model.inner
    recursion = recursion_of(inner, cfg)
    if recursion is None:
        return None
    if cfg.halt_max_steps > 1 and model.act_in_training() and model.trains_continue_head(compute_target_q=False):
        recursion = replace(recursion, second_pass=True)
    S, L, D, V, e = cfg.seq_len + cfg.prefix_len, cfg.seq_len, cfg.hidden_size, cfg.vocab_size, cfg.dtype.itemsize
    inter = swiglu_intermediate_size(D, cfg.expansion)

    param_bytes = _bytes(model.parameters())
    sparse = getattr(inner, "puzzle_emb", None)
    sparse_buffers = list(sparse.buffers()) if sparse is not None else []
    other_buffers = [b for b in model.buffers() if all(b is not s for s in sparse_buffers)]
    table_bytes = _bytes([sparse.weights]) if sparse is not None else 0
    ndim = cfg.puzzle_emb_ndim

    parts = {"weights": param_bytes + _bytes(other_buffers), "gradients": param_bytes}
    if not (config.freeze_weights and sparse is not None):
        parts["optimizer"] = 2 * param_bytes
    if sparse is not None:
        # The table, this micro-batch's rows (+ grad, ids), and the row gradients of the earlier micro-batches.
        parts["puzzle_table"] = table_bytes + mb * (2 * 4 * ndim + 4) + (slots - 1) * mb * (4 * ndim + 4)
    if config.ema:
        parts["ema"] = param_bytes + param_bytes + _bytes(model.buffers())  # shadow + evaluation copy
    # Every slot's carry: latents, plus current puzzle (inputs, labels, ids; int32), steps and halted.
    parts["carries"] = local_batch * (recursion.latent_states * S * D * e + (2 * L + 1) * 4 + 5)

    block = next(m for m in inner.modules() if isinstance(m, trm.TRMBlock))
    # Not float32: every call casts each block weight to the forward dtype, and the copy is saved for backward.
    cast_copy = sum(p.numel() for p in block.parameters()) * e if cfg.dtype != torch.float32 else 0
    per_call = block_activation_bytes(cfg, mb) + cast_copy
    if getattr(cfg, "recompute", False):
        activations = recursion.grad_block_calls * (mb * S * D * e + cast_copy) + per_call
    else:
        activations = recursion.grad_block_calls * per_call
    activations += mb * (S * D * e + S * V * e + L * V * (4 * 8 + 1))  # heads and loss
    if compiled and device_type == "cuda" and not getattr(cfg, "recompute", False):
        activations = int(activations * COMPILED_ACTIVATION_FACTOR["mlp_t" if cfg.mlp_t else "attention"]
                          * compile_budget_kept(config.compile_memory_budget))
    parts["activations"] = activations
    working = mb * S * (e * D * (recursion.latent_states + recursion.new_latents) + 4 * 2 * D)
    if recursion.second_pass:
        working += mb * S * e * 4 * inter
    parts["working"] = working
    parts["runtime"] = RUNTIME_BYTES.get(device_type, 0)
    return MemoryEstimate(micro_batch_size=mb, parts=parts)


def fitting_micro_batch_size(config: PretrainConfig, metadata: PuzzleDatasetMetadata, world_size: int,
                             device_type: str, compiled: bool, budget: int, below: Optional[int] = None
                             ) -> Optional[MemoryEstimate]:
    """The estimate at the largest micro_batch_size (a divisor of the per-rank batch, below `below` if given) whose
    step fits in `budget` bytes; None when not even one row fits."""
    local_batch = config.global_batch_size // world_size
    for mb in sorted((d for d in range(1, local_batch + 1) if local_batch % d == 0), reverse=True):
        if below is not None and mb >= below:
            continue
        estimate = estimate_step_memory(config, metadata, world_size, device_type, compiled, micro_batch_size=mb)
        if estimate.total <= budget:
            return estimate
    return None


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_available_bytes() -> int:
    """Memory the host can still give: MemAvailable (else free pages), capped by the cgroup's limit (a container
    is killed at its limit, whatever the host has)."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2 ** 60:
            available = min(available, max(0, limit - usage))
    return available


def available_memory(device: torch.device) -> Tuple[int, str]:
    """(bytes this rank may still use, where the number comes from). On the CPU, the ranks of this host share
    its memory. AVAILABLE_OVERRIDE_ENV replaces the number (for tests)."""
    override = os.environ.get(AVAILABLE_OVERRIDE_ENV)
    if override:
        return int(override), AVAILABLE_OVERRIDE_ENV
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = f", shared by {ranks_here} ranks" if ranks_here > 1 else ""
    return host_available_bytes() // ranks_here, f"available on this host{share}"


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2 ** 20:.0f} MiB"


def describe(estimate: MemoryEstimate, config: PretrainConfig, world_size: int) -> str:
    largest = max(estimate.parts, key=estimate.parts.get)
    return (f"about {gib(estimate.total)} (estimate for micro-batch {estimate.micro_batch_size} of global_batch_size "
            f"{config.global_batch_size} on {world_size} rank{'s' if world_size > 1 else ''}, {largest} "
            f"{gib(estimate.parts[largest])})")


def advice(config: PretrainConfig, metadata: PuzzleDatasetMetadata, world_size: int, device_type: str,
           compiled: bool, budget: int, below: Optional[int] = None) -> str:
    """How to make the step fit in `budget` bytes with MARGIN to spare: a micro_batch_size, or a bigger device."""
    local_batch = config.global_batch_size // world_size
    if estimate_step_memory(config, metadata, world_size, device_type, compiled) is None:
        return f"try a smaller micro_batch_size (a divisor of the per-rank batch {local_batch})"
    fit = fitting_micro_batch_size(config, metadata, world_size, device_type, compiled, int(MARGIN * budget), below)
    if fit is None:
        one = estimate_step_memory(config, metadata, world_size, device_type, compiled, micro_batch_size=1)
        return (f"not even micro_batch_size=1 fits (about {gib(one.total)}): use a device with more memory, or more "
                "ranks if the carries are large")
    spare = 100 - round(100 * MARGIN)
    return (f"set micro_batch_size={fit.micro_batch_size} (about {gib(fit.total)}, leaving {spare}% for the estimate's "
            f"error; the global batch stays {config.global_batch_size})")


def check_fits(config: PretrainConfig, metadata: PuzzleDatasetMetadata, dist_info: distributed.DistInfo,
               compiled: bool) -> None:
    """Before training: raise ConfigError (one line: the estimate, the memory available, a micro_batch_size that
    fits) when the step's estimate exceeds this device's available memory on any rank. Off with
    check_memory=False."""
    if not config.check_memory:
        return
    device_type = dist_info.device.type
    estimate = estimate_step_memory(config, metadata, dist_info.world_size, device_type, compiled)
    available, source = available_memory(dist_info.device)
    # Every rank takes the same decision, from the rank with the least memory.
    available, source = min(distributed.all_gather_objects((available, source)))
    if estimate is None or estimate.total <= available:
        return
    raise ConfigError(
        f"a training step needs {describe(estimate, config, dist_info.world_size)}, more than the "
        f"{gib(available)} {source}; {advice(config, metadata, dist_info.world_size, device_type, compiled, available)}"
        ", or check_memory=False to try anyway")


def out_of_memory_advice(config: PretrainConfig, metadata: PuzzleDatasetMetadata, dist_info: distributed.DistInfo,
                         compiled: bool, micro_batch_size: int) -> str:
    """The line for a CUDA out-of-memory error in a training step: the estimate, the device's total memory and a
    micro_batch_size below the current one that fits."""
    device = dist_info.device
    total = int(os.environ.get(AVAILABLE_OVERRIDE_ENV) or (
        torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else host_available_bytes()))
    estimate = estimate_step_memory(config, metadata, dist_info.world_size, device.type, compiled)
    needs = describe(estimate, config, dist_info.world_size) if estimate is not None else "more"
    hint = advice(config, metadata, dist_info.world_size, device.type, compiled, total, below=micro_batch_size)
    rank = f"rank {dist_info.rank}: " if dist_info.world_size > 1 else ""  # it may be one rank's alone
    return f"{rank}out of memory in a training step on {device} ({gib(total)} in total; the step needs {needs}); {hint}"
