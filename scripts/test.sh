#!/usr/bin/env bash
# Install everything the test suite needs, lint, then run the tests.
#
#   bash scripts/test.sh            # from any directory: lint and the whole suite
#   bash scripts/test.sh -k batching -x
#
# Extra arguments go to pytest; test paths in them are relative to the repository root,
# where this script runs. Works on a fresh machine that has only Python 3.11 and pip, and
# is safe to run again: each step skips what is already installed.
#
# Lint is `ruff check server client tests benchmarks` and `mypy server client` (versions
# pinned in the test extra of pyproject.toml). It runs before pytest when the script has
# no arguments (the whole suite, what CI runs) and is skipped when it has any (a subset,
# where a developer wants only those tests). WKR_LINT=1 runs it in any case, WKR_LINT=0
# never. A lint failure does not stop the tests: both run, and the script exits non-zero
# if either failed.
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
# real Redis of the job-queue tests (tests/redis_server.py starts one per test); curl
# runs the examples' README commands as written (tests/test_example_*.py).
APT_PACKAGES=(chromium redis-server curl)

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

# Whether to lint: WKR_LINT=1 or 0 decides; unset, only a run without arguments lints.
want_lint() {
    case "${WKR_LINT:-}" in
        1) return 0 ;;
        0) return 1 ;;
        "") (( $# == 0 )) ;;
        *) log "WKR_LINT must be 1, 0 or unset, not '${WKR_LINT}'"; exit 2 ;;
    esac
}

# Run ruff and mypy (both, even when the first fails); fail if either found a problem.
run_lint() {
    local status=0
    log "$PYTHON -m ruff check server client tests benchmarks"
    "$PYTHON" -m ruff check server client tests benchmarks || status=1
    log "$PYTHON -m mypy server client"
    "$PYTHON" -m mypy server client || status=1
    return "$status"
}

run_tests() {
    log "$PYTHON -m pytest -q $*"
    "$PYTHON" -m pytest -q "$@"
}

lint=0
if want_lint "$@"; then  # decided first: a bad WKR_LINT stops before any install
    lint=1
fi
install_apt_packages
install_python_packages
lint_status=0
if (( lint )); then
    run_lint || lint_status=$?
fi
test_status=0
run_tests "$@" || test_status=$?
if (( lint_status != 0 )); then
    log "lint failed (ruff or mypy, see above)"
fi
# pytest's own exit code first (it says what went wrong), else the lint's
(( test_status != 0 )) && exit "$test_status"
exit "$lint_status"
