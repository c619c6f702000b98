#!/usr/bin/env bash
# Install Debian's chromium for the browser tests (tests/test_pages.py), unless one is already on PATH.
# Runs apt-get directly as root, through sudo otherwise; exits non-zero (and the tests skip) where neither works.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "no apt-get on this machine: install chromium yourself to run the browser tests" >&2
    exit 1
fi
as_root=()
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        echo "not root and no password-less sudo: cannot apt-get install chromium" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing on a fresh machine: update once and retry.
"${as_root[@]+"${as_root[@]}"}" apt-get install -y -q chromium >/dev/null 2>&1 || {
    "${as_root[@]+"${as_root[@]}"}" apt-get update -q >/dev/null 2>&1
    "${as_root[@]+"${as_root[@]}"}" apt-get install -y -q chromium >/dev/null
}
command -v chromium >/dev/null 2>&1
