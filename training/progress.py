"""What a training run shows on the console (rank 0): a bar over the optimizer steps the run will take, with the
loss and the accuracies of the puzzles that recently finished, and one readable line per evaluation set. What is
logged (W&B, metrics.jsonl) is not touched here."""

import collections
from typing import Dict, List, Optional

import tqdm

WINDOW = 50  # steps the bar's numbers average over

LEGEND = (f"train bar: loss = mean train/lm_loss of the last {WINDOW} steps; token_acc / exact_acc = labelled "
          f"tokens right / puzzles entirely right, over the puzzles that halted in the last {WINDOW} steps")


def steps_to_run(dataset, num_passes: int, total_steps: int) -> int:
    """Optimizer steps of a run of `num_passes` train passes: the batches the loader yields, at most total_steps
    (an estimate from the dataset's mean puzzle size; the trainer stops there and skips any surplus batches)."""
    steps = 0
    for pass_number in range(1, num_passes + 1):
        steps += dataset.batches_in_pass(pass_number)
        if steps >= total_steps:
            return total_steps
    return steps


class TrainProgress:
    """The training bar. `update` takes one step's logged metrics (train/<name>, accuracies normalised by the
    rows that halted) and that step's number of halted rows, and shows averages over the last WINDOW steps, each
    step's accuracies weighted by its halted rows (most steps of a run can have none: a batch's rows often halt
    together)."""

    def __init__(self, total: int, initial: int = 0):
        self.bar = tqdm.tqdm(total=total, initial=min(initial, total), desc="train", unit="step")
        self.bar.write(LEGEND)
        self.recent = collections.deque(maxlen=WINDOW)  # (lm_loss, halted rows, token-accuracy sum, exact sum)

    def update(self, metrics: Dict[str, float], halted_rows: int) -> None:
        self.recent.append((metrics["train/lm_loss"], halted_rows, metrics["train/accuracy"] * halted_rows,
                            metrics["train/exact_accuracy"] * halted_rows))
        loss = sum(r[0] for r in self.recent) / len(self.recent)
        halted = sum(r[1] for r in self.recent)
        shown = {"loss": f"{loss:.3f}"}
        if halted:
            shown["token_acc"] = f"{sum(r[2] for r in self.recent) / halted:.1%}"
            shown["exact_acc"] = f"{sum(r[3] for r in self.recent) / halted:.1%}"
        else:  # no puzzle has halted yet
            shown["token_acc"] = shown["exact_acc"] = "-"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update()

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


# How an evaluation metric reads on the console: (label, what it counts, as a percentage).
EVAL_LABELS = {
    "accuracy": ("accuracy", "of labelled tokens", True),
    "exact_accuracy": ("exact_accuracy", "of puzzles", True),
    "q_halt_accuracy": ("q_halt_accuracy", "halting head right", True),
}


def format_metric(name: str, value: float) -> str:
    label, counts, percent = EVAL_LABELS.get(name, (name, "", "accuracy" in name or "pass@" in name))
    text = f"{label} {value:.2%}" if percent else f"{label} {value:.4g}"
    return f"{text} ({counts})" if counts else text


def format_eval(step: int, metrics: Optional[Dict]) -> List[str]:
    """One line per evaluated set (`step 390 eval all: accuracy 89.60% (of labelled tokens), ...`) and one for
    the evaluators' metrics (ARC/pass@k, ...), named as they are logged."""
    lines, extra = [], []
    for key, value in (metrics or {}).items():
        if isinstance(value, dict):
            lines.append(f"step {step} eval {key}: " + ", ".join(format_metric(k, v) for k, v in value.items()))
        else:
            extra.append(format_metric(key, value))
    if extra:
        lines.append(f"step {step} eval: " + ", ".join(extra))
    return lines
