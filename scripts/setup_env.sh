#!/usr/bin/env bash
# Create ./.venv and install the requirements into it; re-running reuses what is installed.
# Torch: the CPU build where there is no NVIDIA GPU on Linux (the CUDA build weighs several GB), the default
# build otherwise (CUDA on Linux with a GPU, the usual wheel on macOS). No CUDA compilation is ever needed:
# the fused adam-atan2 kernel is optional (see README, Troubleshooting).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "Creating virtual environment .venv"
    "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python

# The stamp names what was installed: the requirements, this script (its package lists) and the extra.
stamp=".venv/.installed-$("$VPY" -c 'import hashlib,sys; print(hashlib.sha1(open("requirements.txt","rb").read()+open(sys.argv[2],"rb").read()+sys.argv[1].encode()).hexdigest()[:12])' "${1:-}" "${BASH_SOURCE[0]}")"
if [ -f "$stamp" ]; then
    exit 0
fi

"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
    if [ "$(uname -s)" = "Linux" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "Installing torch (CPU build)"
        # The +cpu wheel outranks PyPI's CUDA wheel of the same version when the PyTorch CPU index is reachable;
        # where it is not (closed networks, local mirrors), pip's own index decides.
        extra=()
        if "$VPY" -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null; then
            extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
        fi
        "$VPY" -m pip install -q "torch==2.13.0" ${extra[@]+"${extra[@]}"}
    else
        echo "Installing torch"
        "$VPY" -m pip install -q "torch==2.13.0"
    fi
fi
echo "Installing requirements"
"$VPY" -m pip install -q -r requirements.txt
if [ "${1:-}" = "test" ]; then
    # Test-only: the browser tests drive Chromium through Playwright's Python client (the browser is the
    # system's chromium, which .ci/run installs; Playwright's own browser download is not used).
    "$VPY" -m pip install -q pytest pytest-xdist playwright
    # Optional: with the modal client the tests also check infra/modal_app.py's Modal functions.
    "$VPY" -m pip install -q modal || echo "modal could not be installed: tests check infra/modal_app.py without it"
    # Optional: with Triton (no GPU needed) tests/test_kernels.py runs the fused CUDA kernels in Triton's CPU
    # interpreter against the plain layers' maths.
    "$VPY" -m pip install -q triton || echo "triton could not be installed: the interpreter test of the kernels will skip"
fi
touch "$stamp"
