"""Build a model from a checkpoint: the one loader that the eval runner, the demo server and the tests use.

Where the architecture comes from, first match wins:
  1. `step_<N>.config.yaml` beside the weights file: written by pretrain.py with every checkpoint (the resolved
     architecture, loss, the dataset facts the model depends on and a sha256 of each training dataset.json);
  2. `all_config.yaml` in the checkpoint's folder: the resolved run config that the reference's and this project's
     trainers write into every run folder;
  3. the weights themselves: hidden size, blocks, vocabulary, puzzle-embedding width and rows, attention or
     MLP-T, learned positions and (with MLP-T or learned positions) the sequence length and prefix length are
     read from the tensors' names and shapes. The rest (cycle counts, halting steps, heads) cannot be seen in the
     weights and is taken from the config file; one printed line says which values were assumed.
Explicit `arch.<key>=<value>` overrides win over all three; `arch=<name>` selects config/arch/<name>.yaml as a
whole, except that a saved config of the same class keeps its values. An override that contradicts the weights is refused with one line (CheckpointError)."""

import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import pydantic
import torch
import yaml

from dataset.common import PuzzleDatasetMetadata
from models.arch import ArchConfig
from models.build import build_model
from models.layers import swiglu_intermediate_size
from training.checkpoint import (CheckpointError, load_model_state, read_state_dict, sha256_file, strip_prefixes,
                                 unwrap)
from training.config import PretrainConfig, compose_config
from utils.atomic import atomic_write_text
from utils.errors import ConfigError
from utils.functions import load_model_class
from utils.hub import resolve_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG_FILE = os.path.join(REPO_ROOT, "config", "cfg_pretrain.yaml")
DESCRIPTION_SUFFIX = ".config.yaml"  # step_<N> -> step_<N>.config.yaml
RUN_CONFIG_NAME = "all_config.yaml"
DESCRIPTION_FORMAT = 1

_INNER = "model.inner."


@dataclass
class LoadedModel:
    model: torch.nn.Module  # the loss head (its `.model` is the ACT model), weights loaded, in eval mode
    config: PretrainConfig  # the resolved config; config.arch is the architecture that was built
    metadata: PuzzleDatasetMetadata  # the dataset facts the model was built for
    checkpoint_file: str  # local path of the weights (hub checkpoints resolved)
    arch_source: str  # where the architecture came from: a file path, or "the weights"
    assumed: Dict[str, object] = field(default_factory=dict)  # settings the weights could not determine


def description_path(checkpoint_file: str) -> str:
    return checkpoint_file + DESCRIPTION_SUFFIX


def checkpoint_description(config: PretrainConfig, metadata: PuzzleDatasetMetadata, step: int) -> dict:
    """What `step_<N>.config.yaml` holds: enough to rebuild the model without the training command line."""
    hashes = {}
    for path in config.data_paths:
        json_path = os.path.join(path, "train", "dataset.json")
        if os.path.isfile(json_path):
            hashes[path] = sha256_file(json_path)
    return {
        "format": DESCRIPTION_FORMAT,
        "step": step,
        "arch": config.arch.model_dump(),
        "data": {"vocab_size": metadata.vocab_size, "seq_len": metadata.seq_len,
                 "num_puzzle_identifiers": metadata.num_puzzle_identifiers,
                 "data_paths": list(config.data_paths), "dataset_json_sha256": hashes},
        "training": {"global_batch_size": config.global_batch_size, "seed": config.seed, "ema": config.ema,
                     "lr": config.lr, "epochs": config.epochs},
    }


def write_checkpoint_description(checkpoint_file: str, config: PretrainConfig, metadata: PuzzleDatasetMetadata,
                                 step: int) -> None:
    header = ("# The configuration these weights were trained with (written by pretrain.py beside the weights).\n"
              "# scripts/run_eval_only.py and inference/model_loader.py rebuild the model from it.\n")
    text = header + yaml.safe_dump(checkpoint_description(config, metadata, step), sort_keys=False)
    atomic_write_text(description_path(checkpoint_file), text)


# ---------------------------------------------------------------------------------------------------------------
# Reading what the weights determine


@dataclass
class WeightFacts:
    hidden_size: int
    vocab_size: int
    stack_layers: Dict[str, int]  # blocks per stack present in the weights: {"L_layers": n, "H_layers": m}
    mlp_t: bool
    learned_positions: bool
    puzzle_emb_ndim: int
    puzzle_rows: Optional[int]
    total_len: Optional[int]  # seq_len + puzzle prefix, when MLP-T or learned positions fix it
    intermediate: Optional[int]  # the channel SwiGLU's intermediate size


def read_weight_facts(state_dict: Dict[str, torch.Tensor], source: str) -> WeightFacts:
    sd = strip_prefixes(state_dict)
    embed = sd.get(_INNER + "embed_tokens.embedding_weight")
    if embed is None or embed.dim() != 2:
        raise CheckpointError(f"{source} has no {_INNER}embed_tokens.embedding_weight: it is not a TRM checkpoint "
                              f"written by this project or the reference; pass arch=<name> for other models")
    stacks: Dict[str, set] = {}
    for key in sd:
        m = re.match(re.escape(_INNER) + r"([HL])_level\.layers\.(\d+)\.", key)
        if m:
            stacks.setdefault(f"{m.group(1)}_layers", set()).add(int(m.group(2)))
    first_block = next((f"{_INNER}{level}_level.layers.0." for level in ("L", "H") if f"{level}_layers" in stacks), "")
    mlp_t = any(".mlp_t." in k for k in sd)
    table = sd.get(_INNER + "puzzle_emb.weights")
    pos = sd.get(_INNER + "embed_pos.embedding_weight")
    total_len = None
    if pos is not None:
        total_len = pos.shape[0]
    elif mlp_t:
        down = sd.get(first_block + "mlp_t.down_proj.weight")
        total_len = down.shape[0] if down is not None else None
    gate = sd.get(first_block + "mlp.gate_up_proj.weight")
    return WeightFacts(hidden_size=embed.shape[1], vocab_size=embed.shape[0],
                       stack_layers={k: max(v) + 1 for k, v in stacks.items()}, mlp_t=mlp_t, learned_positions=pos is not None,
                       puzzle_emb_ndim=table.shape[1] if table is not None else 0,
                       puzzle_rows=table.shape[0] if table is not None else None, total_len=total_len,
                       intermediate=gate.shape[0] // 2 if gate is not None else None)


def _class_fields(arch: dict) -> dict:
    """The model class's config fields (name -> pydantic field), {} when the class cannot be imported."""
    try:
        return dict(load_model_class(arch["name"]).config_class.model_fields)
    except (KeyError, ConfigError, AttributeError):
        return {}


def _prefix_len(arch: dict) -> int:
    """Puzzle-prefix positions an arch builds (puzzle_emb_len 0, or a class without the field, means as many as
    the embedding needs)."""
    field_info = _class_fields(arch).get("puzzle_emb_len")
    default = field_info.default if field_info is not None else 0
    ndim, length = int(arch.get("puzzle_emb_ndim", 0)), int(arch.get("puzzle_emb_len", default))
    if length == 0:
        return math.ceil(ndim / int(arch["hidden_size"])) if ndim else 0
    return length


def _expansion_for(hidden_size: int, intermediate: int, current: float) -> Optional[float]:
    """An expansion that gives this intermediate size: `current` if it does, else the smallest multiple of 1/4."""
    if swiglu_intermediate_size(hidden_size, current) == intermediate:
        return current
    for quarter in range(1, 129):
        if swiglu_intermediate_size(hidden_size, quarter / 4) == intermediate:
            return quarter / 4
    return None


def _square_grid_prefix(facts: WeightFacts, configured: int) -> int:
    def square(n):
        return n > 0 and math.isqrt(n) ** 2 == n
    shortest = math.ceil(facts.puzzle_emb_ndim / facts.hidden_size)
    if configured >= shortest and square(facts.total_len - configured):
        return configured
    return next((p for p in range(shortest, facts.total_len) if square(facts.total_len - p)), configured)


def infer_arch(facts: WeightFacts, arch: dict, seq_len: Optional[int]) -> Tuple[dict, List[str]]:
    """The settings the weights determine, as arch fields, and the names of those taken from `arch` unseen."""
    inferred = {"hidden_size": facts.hidden_size, **facts.stack_layers, "mlp_t": facts.mlp_t,
                "puzzle_emb_ndim": facts.puzzle_emb_ndim}
    assumed = ["H_cycles", "L_cycles", "halt_max_steps"]
    if facts.learned_positions:
        inferred["pos_encodings"] = "learned"
    elif facts.mlp_t:
        inferred["pos_encodings"] = "none"  # no attention: positions have no effect
    else:
        assumed.append("pos_encodings")  # rope and none leave no weights
    if not facts.mlp_t:
        assumed.append("num_heads")
    if facts.intermediate is not None:
        expansion = _expansion_for(facts.hidden_size, facts.intermediate, float(arch.get("expansion", 4)))
        if expansion is not None:
            inferred["expansion"] = expansion
    if facts.puzzle_emb_ndim == 0:
        inferred["puzzle_emb_len"] = 0
    elif facts.total_len is not None and seq_len is not None and facts.total_len > seq_len:
        inferred["puzzle_emb_len"] = facts.total_len - seq_len
    elif facts.total_len is not None:
        # No dataset to split seq_len + prefix: every task here is a square grid (9x9, 30x30), so take the
        # configured prefix if it leaves a square, else the shortest prefix that holds the embedding and does.
        inferred["puzzle_emb_len"] = _square_grid_prefix(facts, int(arch.get("puzzle_emb_len", 16)))
        assumed.append("puzzle_emb_len")
    else:
        assumed.append("puzzle_emb_len")
    known = _class_fields(arch)
    if known:  # e.g. HRM has no puzzle_emb_len, the transformer baseline no mlp_t
        inferred = {k: v for k, v in inferred.items() if k in known}
        assumed = [k for k in assumed if k in known]
    return inferred, assumed


def weight_conflicts(facts: WeightFacts, arch: dict, seq_len: Optional[int]) -> List[str]:
    """Arch settings that cannot produce these weights, each as `arch.<key>=<value> (...)`."""
    out = []

    def differs(key, weights_value, why):
        out.append(f"arch.{key}={arch.get(key)} ({why} {weights_value})")

    if int(arch.get("hidden_size", -1)) != facts.hidden_size:
        out.append(f"arch.hidden_size={arch.get('hidden_size')} (the width differs: the weights are "
                   f"{facts.hidden_size} wide, {_INNER}embed_tokens.embedding_weight is "
                   f"{[facts.vocab_size, facts.hidden_size]})")
    for key, blocks in facts.stack_layers.items():
        if int(arch.get(key, -1)) != blocks:
            differs(key, blocks, "the weights have blocks:")
    if bool(arch.get("mlp_t", False)) != facts.mlp_t:
        differs("mlp_t", facts.mlp_t, "the weights are" if facts.mlp_t else "the weights have attention, mlp_t")
    if (arch.get("pos_encodings") == "learned") != facts.learned_positions:
        differs("pos_encodings", "learned" if facts.learned_positions else "rope or none",
                "the weights' positions are")
    if int(arch.get("puzzle_emb_ndim", 0)) != facts.puzzle_emb_ndim:
        differs("puzzle_emb_ndim", facts.puzzle_emb_ndim, "the weights' puzzle embedding is")
    if (facts.intermediate is not None and "expansion" in arch and "hidden_size" in arch
            and swiglu_intermediate_size(int(arch["hidden_size"]), float(arch["expansion"])) != facts.intermediate
            and int(arch["hidden_size"]) == facts.hidden_size):
        differs("expansion", _expansion_for(facts.hidden_size, facts.intermediate, 4.0),
                "the weights' SwiGLU size needs")
    if (facts.total_len is not None and seq_len is not None and facts.puzzle_emb_ndim
            and int(arch.get("hidden_size", -1)) == facts.hidden_size and seq_len + _prefix_len(arch) != facts.total_len
            and facts.total_len > seq_len):
        differs("puzzle_emb_len", facts.total_len - seq_len, "the weights' sequence prefix is")
    return out


def load_weights_for_training(model: torch.nn.Module, checkpoint: str, arch: ArchConfig, seq_len: int) -> str:
    """Fine-tuning start (pretrain.py load_checkpoint): the training config names the architecture; weights that
    it cannot hold are refused with one line naming the settings, and a puzzle table of another size is replaced
    by its row mean. Returns the local checkpoint file."""
    checkpoint_file = resolve_checkpoint(checkpoint)
    state_dict = read_state_dict(checkpoint_file)
    conflicts = weight_conflicts(read_weight_facts(state_dict, checkpoint_file), arch.model_dump(), seq_len)
    if conflicts:
        raise CheckpointError(f"load_checkpoint={checkpoint} does not match the training config: {'; '.join(conflicts)}; "
                              f"set these arch keys to the weights' values")
    load_model_state(model, state_dict, resize_puzzle_table=True, source=checkpoint_file)
    return checkpoint_file


# ---------------------------------------------------------------------------------------------------------------
# The loader


def explicit_arch_keys(overrides: Sequence[str]) -> Tuple[set, bool]:
    """Arch fields set by `arch.<key>=...` overrides, and whether `arch=<name>` selected a whole arch file."""
    keys, whole = set(), False
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0].strip()
        if key == "arch":
            whole = True
        elif key.startswith("arch."):
            keys.add(key[len("arch."):].split(".")[0])
    return keys, whole


def find_description(checkpoint_file: str) -> Tuple[Optional[dict], Optional[dict], Optional[str]]:
    """(arch, data facts, path) from the checkpoint's own description or its run folder's all_config.yaml."""
    for path, kind in ((description_path(checkpoint_file), "step"),
                       (os.path.join(os.path.dirname(os.path.abspath(checkpoint_file)), RUN_CONFIG_NAME), "run")):
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise CheckpointError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix or delete it") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("arch"), dict):
            raise CheckpointError(f"{path} has no 'arch' mapping; it is not a checkpoint config: fix or delete it")
        data = raw.get("data") if kind == "step" and isinstance(raw.get("data"), dict) else None
        return dict(raw["arch"]), data, path
    return None, None, None


def _metadata_from(facts: WeightFacts, arch: dict, data: Optional[dict], source: str) -> PuzzleDatasetMetadata:
    """Dataset facts for building the model without a dataset (e.g. a demo server)."""
    if data is not None:
        vocab, seq_len, rows = data["vocab_size"], data["seq_len"], data["num_puzzle_identifiers"]
    else:
        if facts.total_len is None:
            raise CheckpointError(f"{source}: the sequence length cannot be read from these weights (attention with "
                                  f"rope or no positions) and there is no saved config; pass the dataset's metadata")
        vocab, rows = facts.vocab_size, facts.puzzle_rows or 1
        seq_len = facts.total_len - _prefix_len(arch)
    return PuzzleDatasetMetadata(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=vocab, seq_len=seq_len,
                                 num_puzzle_identifiers=rows, total_groups=0, mean_puzzle_examples=1.0,
                                 total_puzzles=0, sets=["all"])


def format_arch(arch: ArchConfig, model: Optional[torch.nn.Module] = None) -> str:
    """One line: the class and the settings that shape the model (forward_dtype as built, when `model` is given)."""
    fields = dict(arch.model_extra or {})
    built = getattr(getattr(unwrap(model), "model", None), "config", None) if model is not None else None
    if built is not None and hasattr(built, "forward_dtype"):
        fields["forward_dtype"] = built.forward_dtype
    keys = ("hidden_size", "L_layers", "H_cycles", "L_cycles", "halt_max_steps", "mlp_t", "pos_encodings",
            "num_heads", "expansion", "puzzle_emb_ndim", "puzzle_emb_len", "forward_dtype")
    return " ".join([arch.name.split("@")[-1]] + [f"{k}={fields[k]}" for k in keys if k in fields])


def load_model_from_checkpoint(checkpoint: str, *, dataset_metadata: Optional[PuzzleDatasetMetadata] = None,
                               overrides: Sequence[str] = (), device="cpu", batch_size: int = 1,
                               config: Optional[PretrainConfig] = None, config_file: str = DEFAULT_CONFIG_FILE,
                               resize_puzzle_table: bool = False, verbose: bool = True) -> LoadedModel:
    """Build the loss head + model that `checkpoint` was trained as and load its weights.

    checkpoint: a step_<N> file, a run folder (its highest step_<N>) or hf://owner/repo[/file].
    dataset_metadata: the dataset to run on (its vocab_size, seq_len, num_puzzle_identifiers); None: taken from
        the checkpoint's saved config, else read from the weights.
    overrides: Hydra-style overrides (e.g. ["arch.L_cycles=4", "arch=trm_mlp"]); they win over the saved config.
    device, batch_size: where the model lives and the rows per forward (sizes the puzzle-embedding buffer).
    config: an already composed config (with `overrides` applied), else composed from `config_file`.
    resize_puzzle_table: True lets a puzzle table of another size be replaced by its row mean (fine-tuning).
    verbose: print one line with the architecture used (and one with what was assumed, if anything).

    Returns a LoadedModel (.model in eval mode, .config, .metadata, .checkpoint_file, .arch_source, .assumed).
    Raises CheckpointError / ConfigError / FileNotFoundError with one-line messages."""
    device = torch.device(device)
    checkpoint_file = resolve_checkpoint(checkpoint, verbose)
    state_dict = read_state_dict(checkpoint_file)
    facts = read_weight_facts(state_dict, checkpoint_file)
    if config is None:
        config = compose_config(config_file, list(overrides), fixed=dict(data_paths=[]))
    composed = config.arch.model_dump()
    explicit, whole = explicit_arch_keys(overrides)

    saved, data, saved_path = find_description(checkpoint_file)
    seq_len = dataset_metadata.seq_len if dataset_metadata is not None else (data or {}).get("seq_len")
    assumed: Dict[str, object] = {}
    if whole and not (saved is not None and saved.get("name") == composed.get("name")):
        arch = composed  # arch=<name> of another class than the saved one: the user names the whole architecture
        source = "the arch file selected on the command line"
    elif saved is not None:
        arch = {**saved, **{k: composed[k] for k in explicit if k in composed}}
        source = saved_path
    else:
        arch = dict(composed)
        inferred, unseen = infer_arch(facts, arch, seq_len)
        arch.update({k: v for k, v in inferred.items() if k not in explicit})
        assumed = {k: arch.get(k) for k in unseen if k not in explicit}
        source = "the weights"

    conflicts = weight_conflicts(facts, arch, seq_len)
    if conflicts:
        by = "the override" if explicit or whole else f"the saved config {saved_path}"
        raise CheckpointError(f"{checkpoint_file} does not match {by}: {'; '.join(conflicts)}; drop the override "
                              f"or set it to the weights' value")
    try:
        arch_config = ArchConfig(**arch)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        if isinstance(err.get("ctx", {}).get("error"), ConfigError):  # the section's own checks: unknown fields, ranges
            raise err["ctx"]["error"] from None
        raise ConfigError(f"architecture from {source} is incomplete ({str(e).splitlines()[0]})") from None
    config = config.model_copy(update={"arch": arch_config})

    metadata = dataset_metadata or _metadata_from(facts, arch, data, checkpoint_file)
    model = build_model(arch_config, metadata, batch_size=batch_size, device=device)
    load_model_state(model, state_dict, resize_puzzle_table=resize_puzzle_table, source=checkpoint_file)
    model.eval()
    if verbose:
        print(f"Architecture (from {source}): {format_arch(arch_config, model)}")
        if assumed:
            print(f"Not determinable from the weights, assumed: "
                  f"{' '.join(f'{k}={v}' for k, v in assumed.items())} (from {os.path.relpath(config_file)}; "
                  f"set them with arch.<key>=<value>)")
    return LoadedModel(model=model, config=config, metadata=metadata, checkpoint_file=checkpoint_file,
                       arch_source=source, assumed=assumed)
