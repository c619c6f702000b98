"""scripts/plot_metrics.py: metrics.jsonl -> an HTML page with one SVG plot per metric; one-line errors."""

import json
import subprocess
import sys

from tests.conftest import REPO


def run(*args):
    return subprocess.run([sys.executable, "scripts/plot_metrics.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_plots_train_and_eval_metrics(tmp_path):
    rows = [{"step": 0, "num_params": 10}]
    rows += [{"step": s, "train/lm_loss": 2.0 / s, "train/accuracy": s / 10} for s in range(1, 11)]
    rows += [{"step": 10, "all": {"exact_accuracy": 0.25, "accuracy": 0.8}}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(path)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "metrics.html").read_text()
    for key in ("train/lm_loss", "train/accuracy", "all/accuracy", "all/exact_accuracy"):
        assert f'data-key="{key}"' in page
    assert page.count("<svg") == 4 and "last 0.2 at step 10" in page  # train/lm_loss ends at 2/10

    out = tmp_path / "only.html"
    assert run(path, "--out", out, "--keys", "train/lm_loss").returncode == 0
    assert out.read_text().count("<svg") == 1


def test_errors_are_one_line(tmp_path):
    result = run(tmp_path / "missing.jsonl")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "metrics_jsonl=True" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "train/lm_loss": 1.0}\nnot json\n')
    result = run(bad)
    assert result.returncode == 2 and "line 2 is not JSON" in result.stderr
    result = run(bad.with_name("ok.jsonl").write_text('{"step": 1, "x": 1}\n') and bad.with_name("ok.jsonl"),
                 "--keys", "y")
    assert result.returncode == 2 and "no metric y" in result.stderr and "it has: x" in result.stderr
