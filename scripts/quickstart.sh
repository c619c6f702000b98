#!/usr/bin/env bash
# Quick start: set up .venv, generate an offline Sudoku dataset, train a small TRM on it (CPU, or the GPU if
# there is one), evaluate it on held-out puzzles. Re-running reuses the environment, the dataset and the training
# (a finished one, or an interrupted one it continues; delete checkpoints/quickstart to train again).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BLANKS=${QUICKSTART_BLANKS:-45}     # blank cells per puzzle, train and test
NUM_TRAIN=${QUICKSTART_TRAIN:-2500}  # generated train puzzles (epochs in config/cfg_quickstart.yaml count these)
NUM_AUG=${QUICKSTART_AUG:-19}        # shuffled copies per train puzzle (digits relabelled, rows/columns permuted)
NUM_TEST=${QUICKSTART_TEST:-1000}
SEED=0
SRC=data/quickstart-sudoku-src-b${BLANKS}-n${NUM_TRAIN}-t${NUM_TEST}
DATA=data/quickstart-sudoku
RUN_DIR=checkpoints/quickstart

bash scripts/setup_env.sh
PY=.venv/bin/python
export WANDB_MODE=${WANDB_MODE:-disabled}

if [ ! -f "$SRC/test.csv" ]; then
    echo "== Generating $NUM_TRAIN + $NUM_TEST Sudoku puzzles with $BLANKS blanks (unique solutions)"
    $PY -m dataset.generate_sudoku --output-dir "$SRC" --num-train "$NUM_TRAIN" --num-test "$NUM_TEST" \
        --min-blanks "$BLANKS" --max-blanks "$BLANKS" --seed "$SEED"
fi
if [ ! -f "$DATA/test/dataset.json" ] || [ "$(cat "$DATA/.source" 2>/dev/null)" != "$SRC aug $NUM_AUG" ]; then
    echo "== Building the dataset $DATA"
    rm -rf "$DATA"
    $PY dataset/build_sudoku_dataset.py --source-dir "$SRC" --output-dir "$DATA" --num-aug "$NUM_AUG" --seed "$SEED"
    echo "$SRC aug $NUM_AUG" > "$DATA/.source"
    rm -rf "$RUN_DIR"  # a checkpoint trained on other data is stale
fi

newest_checkpoint() {  # the run's step_<N> weights file with the highest N (not its .config.yaml), or nothing
    ls -1 "$RUN_DIR" 2>/dev/null | grep -E '^step_[0-9]+$' | sort -t_ -k2 -n | tail -n 1 | sed "s|^|$RUN_DIR/|" || true
}
# +resume=true: a re-run continues an interrupted training from its last saved state; a finished one ends at once.
echo "== Training (config/cfg_quickstart.yaml)"
$PY pretrain.py --config-name cfg_quickstart data_paths="[$DATA]" +run_name=quickstart +checkpoint_path="$RUN_DIR" \
    metrics_jsonl=True +resume=true
checkpoint=$(newest_checkpoint)

echo "== Evaluating $checkpoint on $NUM_TEST held-out puzzles (16 ACT steps)"
$PY scripts/run_eval_only.py --config config/cfg_quickstart.yaml --checkpoint "$checkpoint" --dataset "$DATA" \
    --outdir "$RUN_DIR/eval" --global-batch-size 500 arch.halt_max_steps=16 | grep -v "^Run metrics"
$PY - "$RUN_DIR/eval/eval_report.json" "$BLANKS" "$checkpoint" <<'PYEOF'
import json, sys
from utils.stats import format_wilson_line  # the runner's own line, so the result is stated one way
report = json.load(open(sys.argv[1]))
ci = report["wilson_95"]["all.exact_accuracy"]
line = format_wilson_line("all.exact_accuracy", ci["p"], ci["lo"], ci["hi"], ci["n"]).strip()
print(f"Quick start: {line}: held-out Sudoku puzzles with {sys.argv[2]} blanks solved exactly; "
      f"checkpoint {sys.argv[3]}, outputs in {sys.argv[1].rsplit('/', 1)[0]}")
PYEOF
cat <<EOF
See what the model predicted after each ACT step (8 recorded puzzles, $RUN_DIR/eval/visualizer.json):
  from disk: open visualizers/sudoku_visualizer.html in a browser, choose $RUN_DIR/eval/visualizer.json
  served:    $PY scripts/serve.py --config config/cfg_quickstart.yaml --checkpoint $checkpoint \\
                 --dataset $DATA --outputs $RUN_DIR/eval arch.halt_max_steps=16
             then open http://127.0.0.1:8000/sudoku_visualizer.html
EOF
if [ -f "$RUN_DIR/metrics.jsonl" ]; then
    $PY scripts/plot_metrics.py "$RUN_DIR/metrics.jsonl" | sed 's/^Plotted/Training curves: plotted/'
fi
