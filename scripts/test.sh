#!/usr/bin/env bash
# Sets up everything on a fresh machine (virtual environment, installs) and runs the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
# pytest's 5 means "no tests collected": that is a broken selection, not a pass.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
