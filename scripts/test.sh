#!/usr/bin/env bash
# Install everything (cached venv) and run the test suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
python -m pytest tests -v -rs --durations=15 "$@"
