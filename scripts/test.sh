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
# the report tests open pages in a real headless Chromium, the distribution's package: installed here where
# the machine allows it (root and apt-get); elsewhere those tests are skipped and say why
if ! command -v chromium-headless-shell >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium-headless-shell (Debian's package) for the report tests"
    get_chromium() { timeout 600 apt-get install -y -q chromium-headless-shell >/dev/null 2>&1; }
    get_chromium || { timeout 300 apt-get update -q >/dev/null 2>&1 && get_chromium; } ||
      echo "setup: could not install chromium-headless-shell: the report's browser tests will be skipped"
  else
    echo "setup: no Chromium here and no way to install it (needs root and apt-get): the report's browser" \
      "tests will be skipped"
  fi
fi
cpus="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
workers="${PYTEST_WORKERS:-$(( cpus > 1 ? 2 : 1 ))}"
parallel=()
if [ "$workers" -gt 1 ]; then
  parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
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
