#!/usr/bin/env bash
# The README's first command: set up .venv/ when missing, train the demo model on the simulated
# cohort when none exists (once; 47 min wall measured on a shared, loaded 2-core machine), then open the app on
# http://127.0.0.1:7860 over the demo archive (indexed on first start).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg GRADIO_ANALYTICS_ENABLED=False
if [ ! -f runs/demo/model/config.json ]; then
  echo "[demo] training the demo model (first start only)" >&2
  .venv/bin/python train/run_all.py --config train/configs/demo.yaml --out runs/demo \
    || echo "[demo] training failed; the app opens without a trained model (see the notice)" >&2
fi
exec .venv/bin/m3bind serve --demo "$@"
