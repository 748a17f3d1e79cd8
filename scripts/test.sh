#!/usr/bin/env bash
# Sets up everything on a fresh machine (virtual environment, installs) and runs the test suite.
# Usage: bash scripts/test.sh [pytest args...]
# The test files run on PYTEST_WORKERS pytest processes (default: 2, or 1 on a one-CPU machine), a whole file
# per process (its Ray and fixtures are the file's own); much of a real-CLI test is waiting on processes it
# started, so two share two cores well. PYTEST_WORKERS=1, or a -n of your own, changes that.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
workers="${PYTEST_WORKERS:-$(( $(nproc) > 1 ? 2 : 1 ))}"
parallel=()
if [ "$workers" -gt 1 ] && [[ " $* " != *" -n "* ]] && [[ " $* " != *" -n"[0-9]* ]]; then
  parallel=(-n "$workers" --dist loadfile)
fi
set +e
"$VENV/bin/python" -m pytest "${parallel[@]}" "$@"
rc=$?
set -e
# pytest's 5 means "no tests collected": that is a broken selection, not a pass.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
