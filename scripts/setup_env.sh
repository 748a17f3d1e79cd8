# Sourced by the scripts in this folder: makes .venv with the package and its test dependencies.
# torch is installed first and pinned to 2.13.0: on a CPU-only machine with that wheel cached this is
# instant, and on a GPU machine the registry's 2.13.0 build is the CUDA one. The package itself asks
# only for torch>=2.3, so the second install never swaps the build.
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.persimmon-batch-installed"
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp"
fi
export VENV
