# Sourced by the scripts in this folder: makes .venv with the package and its test dependencies.
# torch is installed first, pinned to 2.13.0, and the package itself asks only for torch>=2.3, so the second
# install never swaps the build. Which build: on a machine with an NVIDIA GPU, the registry's default (the
# CUDA one); without a GPU, the CPU build from PyTorch's CPU wheel index when that can be reached, else
# whatever the configured index and local wheels give (a CPU wheel where one is cached or in a local wheel
# folder; on plain PyPI for Linux x86_64 that is the CUDA build, several GB: said before it starts).
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.persimmon-batch-installed"
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  if "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    : # the wanted torch is already there, whichever build
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: installing torch $TORCH_VERSION (GPU found: the CUDA build; a few minutes the first time)" >&2
    "${pip[@]}" "torch==$TORCH_VERSION"
  elif "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$CPU_INDEX/', timeout=5)" 2>/dev/null; then
    echo "setup: installing torch $TORCH_VERSION, CPU build (no GPU found), from $CPU_INDEX" >&2
    "${pip[@]}" "torch==$TORCH_VERSION" --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
  else
    echo "setup: no GPU found and $CPU_INDEX cannot be reached: installing torch $TORCH_VERSION from the" \
         "configured index (a CPU wheel if one is cached or in a local wheel folder; otherwise PyPI's Linux" \
         "build, which is the CUDA one: several GB)" >&2
    "${pip[@]}" "torch==$TORCH_VERSION"
  fi
  # what was installed, whichever way it came: the build, and how to choose another
  # (numpy comes with the package below: torch's warning that it is missing yet says nothing here)
  "$VENV/bin/python" -W "ignore:Failed to initialize NumPy" - "$CPU_INDEX" <<'PY' >&2 || true
import sys
import torch
cuda = torch.version.cuda
build = f"CUDA {cuda} build" if cuda else "CPU build"
print(f"setup: torch {torch.__version__} ({build}) is installed")
gpu = torch.cuda.is_available() if cuda else False
if cuda and not gpu:
    print("setup: this machine has no usable NVIDIA GPU, so the CUDA build's libraries (GB of nvidia-* wheels) "
          "are dead weight: for the CPU build, remove .venv and rerun with TORCH_CPU_INDEX=<a reachable CPU "
          f"wheel index> (default {sys.argv[1]})")
elif not cuda:
    print("setup: for another build, remove .venv and rerun with TORCH_CPU_INDEX=<index> (CPU builds) or on a "
          "machine with an NVIDIA GPU (the CUDA build)")
PY
  echo "setup: installing persimmon-batch and its dependencies (ray, pyarrow, transformers for the tests...;" \
       "a minute or two the first time)" >&2
  "${pip[@]}" -e ".[test]"
  echo "$want" > "$stamp"
  echo "setup: done; the command is $VENV/bin/persimmon-batch (or run: source $VENV/bin/activate)" >&2
fi
export VENV
