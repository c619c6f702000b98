"""Wilson intervals, exact z per confidence level, the runner's CI lines and the ci_wilson CLI."""

import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from utils.stats import format_wilson_line, wilson_interval, z_for_confidence


@pytest.mark.parametrize(
    "p, n, expected",
    [(0.5, 100, (0.4038, 0.5962)), (0.0, 10, (0.0, 0.2775)), (1.0, 10, (0.7225, 1.0))],
)
def test_wilson_known_values(p, n, expected):
    lo, hi = wilson_interval(p, n)
    assert lo == pytest.approx(expected[0], abs=1e-4)
    assert hi == pytest.approx(expected[1], abs=1e-4)
    assert 0.0 <= lo <= hi <= 1.0


@pytest.mark.parametrize("n", [0, -3])
def test_wilson_no_trials_is_nan(n):
    assert all(math.isnan(x) for x in wilson_interval(0.5, n))


@pytest.mark.parametrize("confidence, z", [(0.90, 1.644854), (0.95, 1.959964), (0.99, 2.575829)])
def test_z_for_confidence(confidence, z):
    assert z_for_confidence(confidence) == pytest.approx(z, abs=1e-6)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 95])
def test_z_rejects_levels_outside_0_1(confidence):
    with pytest.raises(ValueError):
        z_for_confidence(confidence)


def test_runner_line_states_the_measured_value_once():
    # p 0.5, n 100: [40.38%, 59.62%]; p 0.0, n 32: [0.00%, 10.72%] (its midpoint 5.36% is not what was measured)
    assert format_wilson_line("all.exact_accuracy", 0.5, *wilson_interval(0.5, 100), 100) == \
        "  all.exact_accuracy 50.00% (95% Wilson CI [40.38%, 59.62%], N=100)"
    assert format_wilson_line("all.exact_accuracy", 0.0, *wilson_interval(0.0, 32), 32) == \
        "  all.exact_accuracy 0.00% (95% Wilson CI [0.00%, 10.72%], N=32)"
    assert format_wilson_line("ARC/example_pass@2", 0.2, 0.1, 0.3, 7, confidence=0.9) == \
        "  ARC/example_pass@2 20.00% (90% Wilson CI [10.00%, 30.00%], N=7)"


def run_cli(*args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "ci_wilson.py"), *args], capture_output=True, text=True
    )


def test_cli_output():
    # p wins over k; k/n used when p is absent; p is clamped for the interval but printed as given.
    out = run_cli("--p", "0.5", "--k", "1", "--n", "100", "--exact-k", "0", "--exact-n", "10",
                  "--token-p", "1.2", "--token-n", "10")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "Wilson 95% confidence intervals:",
        "- accuracy: p=0.500000, n=100 -> CI: [0.403832, 0.596168]  (half-width=0.096168)",
        "- exact_accuracy: p=0.000000, n=10 -> CI: [0.000000, 0.277533]  (half-width=0.138766)",
        "- token_accuracy: p=1.200000, n=10 -> CI: [0.722467, 1.000000]  (half-width=0.138766)",
    ]


def test_cli_other_confidence_uses_exact_z():
    out = run_cli("--confidence", "0.99", "--p", "0.5", "--n", "100")
    assert out.returncode == 0, out.stderr
    lo, hi = wilson_interval(0.5, 100, 2.5758293035489)
    assert out.stdout.splitlines() == [
        "Wilson 99% confidence intervals:",
        f"- accuracy: p=0.500000, n=100 -> CI: [{lo:.6f}, {hi:.6f}]  (half-width={(hi - lo) / 2:.6f})",
    ]
    assert f"{lo:.6f}" == "0.375280"


@pytest.mark.parametrize("args", [[], ["--n", "5"], ["--exact-k", "3"], ["--p", "0.5", "--n", "0"]])
def test_cli_rejects_incomplete_metrics(args):
    out = run_cli(*args)
    assert out.returncode == 2
    assert "error:" in out.stderr
