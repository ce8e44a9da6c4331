#!/usr/bin/env bash
# Install everything the test suite needs, then run it.
#
#   bash scripts/test.sh            # from any directory
#   bash scripts/test.sh -k batching -x
#
# Extra arguments go to pytest; test paths in them are relative to the repository root,
# where this script runs. Works on a fresh machine that has only Python 3.11 and pip, and
# is safe to run again: each step skips what is already installed.
#
# The interpreter is $PYTHON if set, else python3, else python. On a system whose
# Python refuses pip installs (PEP 668, "externally managed"), create and activate a
# virtual environment first:  python3 -m venv .venv && . .venv/bin/activate
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -n "${PYTHON:-}" ]]; then
    :
elif command -v python3 >/dev/null 2>&1; then
    PYTHON=python3
else
    PYTHON=python
fi

export PIP_NO_INPUT=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

# System packages the tests need: Debian's chromium drives tests/test_dashboard.py
# (through Playwright, with executable_path; no browser download); redis-server is the
# real Redis of the job-queue tests (tests/redis_server.py starts one per test).
APT_PACKAGES=(chromium redis-server)

# Python packages installed beside the project, pinned where the tests need an exact
# version (for example torch==2.13.0, tensorflow). Empty today.
EXTRA_PIP_PACKAGES=()

log() {
    printf '[test.sh] %s\n' "$*" >&2
}

install_apt_packages() {
    (( ${#APT_PACKAGES[@]} )) || return 0
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    (( ${#missing[@]} )) || return 0
    local sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        sudo=(sudo -n)
    fi
    log "apt-get install ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}

install_python_packages() {
    log "$PYTHON -m pip install -e .[test]"
    "$PYTHON" -m pip install -q -e ".[test]"
    if (( ${#EXTRA_PIP_PACKAGES[@]} )); then
        log "$PYTHON -m pip install ${EXTRA_PIP_PACKAGES[*]}"
        "$PYTHON" -m pip install -q "${EXTRA_PIP_PACKAGES[@]}"
    fi
}

run_tests() {
    log "$PYTHON -m pytest -q $*"
    exec "$PYTHON" -m pytest -q "$@"
}

install_apt_packages
install_python_packages
run_tests "$@"
