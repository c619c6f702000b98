"""scripts/quickstart.sh's own logic: which checkpoint it evaluates."""

import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_start_evaluates_the_newest_weights_file(tmp_path):
    """scripts/quickstart.sh picks the run's step_<N> weights file with the highest N, not the description
    (step_<N>.config.yaml) or the predictions beside it, and nothing when there is none."""
    with open(os.path.join(REPO, "scripts", "quickstart.sh")) as f:
        function = re.search(r"^newest_checkpoint\(\) \{.*?^\}$", f.read(), flags=re.M | re.S)
    assert function, "scripts/quickstart.sh has no newest_checkpoint function"
    for name in ("step_390", "step_390.config.yaml", "step_1950", "step_1950.config.yaml", "step_1950_all_preds.0"):
        (tmp_path / name).write_text("x")
    script = f"set -euo pipefail\n{function.group(0)}\nRUN_DIR={tmp_path}; newest_checkpoint\n" \
             f"RUN_DIR={tmp_path / 'missing'}; echo \"[$(newest_checkpoint)]\""
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "step_1950"), "[]"]


def test_quick_start_continues_an_interrupted_training():
    """Re-running after an interruption resumes (without +resume=true pretrain.py refuses the run's folder)."""
    with open(os.path.join(REPO, "scripts", "quickstart.sh")) as f:
        text = f.read().replace("\\\n", " ")
    training = [line for line in text.splitlines() if "pretrain.py" in line and not line.lstrip().startswith("#")]
    assert len(training) == 1 and "+resume=true" in training[0].split(), training
