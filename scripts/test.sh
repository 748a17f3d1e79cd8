#!/usr/bin/env bash
# Sets up everything on a fresh machine (virtual environment, installs) and runs the test suite.
# Usage: bash scripts/test.sh [pytest args...]
# The test files run on PYTEST_WORKERS pytest processes (default: 2, or 1 on a one-CPU machine), a whole file
# per process (its Ray and fixtures are the file's own); much of a real-CLI test is waiting on processes it
# started, so two share two cores well. One process where the arguments need it (-n of your own, --pdb, -s,
# -p no:xdist, --trace), or with PYTEST_WORKERS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
cpus="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
workers="${PYTEST_WORKERS:-$(( cpus > 1 ? 2 : 1 ))}"
parallel=()
if [ "$workers" -gt 1 ]; then
  parallel=(-n "$workers" --dist loadfile)
  for arg in "$@"; do
    case "$arg" in
      -n|-n[0-9]*|--numprocesses*|--pdb|--trace|-s|--capture=no|no:xdist|-pno:xdist) parallel=(); break ;;
    esac
  done
fi
set +e
"$VENV/bin/python" -m pytest ${parallel[@]+"${parallel[@]}"} "$@"
rc=$?
set -e
# pytest's 5 means "no tests collected": that is a broken selection, not a pass.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
