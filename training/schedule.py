"""Learning-rate schedule (docs/compatibility.md section 9): linear warm-up, then cosine decay to
lr_min_ratio * base."""

import math


def cosine_schedule_with_warmup_lr(step: int, *, base_lr: float, num_warmup_steps: int, num_training_steps: int,
                                   min_ratio: float = 0.0) -> float:
    """`step` counts from 1 (the first optimizer step). min_ratio 1.0 (the config default) means no decay."""
    if step < num_warmup_steps:
        return base_lr * float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return base_lr * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))))
