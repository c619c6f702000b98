"""The learning-rate schedule (training/schedule.py) pinned at chosen steps: linear warm-up from step 1, then a
cosine from the base rate down to lr_min_ratio x base at total_steps (docs/compatibility.md section 9)."""

import pytest

from training.schedule import cosine_schedule_with_warmup_lr


def lr(step, base_lr, warmup, total, min_ratio):
    return cosine_schedule_with_warmup_lr(step, base_lr=base_lr, num_warmup_steps=warmup, num_training_steps=total,
                                          min_ratio=min_ratio)


@pytest.mark.parametrize("step, expected", [
    (1, 1e-4),  # warm-up: base * step / warmup
    (5, 5e-4),
    (9, 9e-4),
    (10, 1e-3),  # the warm-up's last step is the first of the cosine, at its top
    (35, 8.681980515339464e-4),  # a quarter of the way: 0.1 + 0.9 * (1 + cos(pi / 4)) / 2
    (60, 5.5e-4),  # half way: 0.1 + 0.9 / 2
    (85, 2.3180194846605365e-4),
    (110, 1e-4),  # total_steps: min_ratio * base
])
def test_warmup_then_cosine_to_the_min_ratio(step, expected):
    assert lr(step, 1e-3, warmup=10, total=110, min_ratio=0.1) == pytest.approx(expected, rel=1e-12)


def test_default_min_ratio_one_is_constant_after_warmup():
    # cfg_pretrain.yaml's lr_min_ratio 1.0, as the reference's recipes run: warm-up, then the base rate throughout.
    assert [lr(s, 1e-4, warmup=10, total=110, min_ratio=1.0) for s in (1, 10, 60, 110)] == \
        pytest.approx([1e-5, 1e-4, 1e-4, 1e-4], rel=1e-12)


def test_no_warmup_and_degenerate_lengths():
    # No warm-up: the cosine starts at step 1, just below the base; it ends at 0 with min_ratio 0.
    assert [lr(s, 2e-4, warmup=0, total=100, min_ratio=0.0) for s in (1, 50, 100)] == \
        pytest.approx([1.9995065603657316e-4, 1e-4, 0.0], rel=1e-12, abs=1e-18)
    assert lr(3, 1e-2, warmup=0, total=0, min_ratio=0.0) == pytest.approx(0.0, abs=1e-18)  # no division by zero
    assert lr(1, 1e-2, warmup=1, total=1, min_ratio=0.5) == pytest.approx(1e-2)  # warm-up of 1: full rate at once
