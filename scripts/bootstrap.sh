#!/usr/bin/env bash
# Set up everything from a fresh clone, then run the pipeline or the tests.
#
#   scripts/bootstrap.sh run    the main job end to end on the local profile
#                               (run --events PATH: on your own event log instead of a synthetic one)
#   scripts/bootstrap.sh test   the test suite (what .ci/run calls)
#
# Idempotent: the virtual environment is reinstalled only when pyproject.toml changes.
set -euo pipefail

caller_dir=$PWD  # paths the caller passes (run --events PATH) are relative to where they stand
cd "$(dirname "$0")/.."
root=$PWD
mode="${1:-}"
case "$mode" in
  run|test) ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else
    echo "bootstrap: need root to run: $*" >&2
    return 1
  fi
}

apt_install() {
  echo "bootstrap: installing Debian packages: $*" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "bootstrap: Python 3.11+ is required (found: $("$python" --version 2>&1))" >&2
  exit 1
fi

if ! command -v redis-server >/dev/null; then
  apt_install redis-server || {
    echo "bootstrap: redis-server is missing; install it, or set DERM_PROFILE=production and" \
      "DERM_REDIS_CONNECTION_STRING for an existing Redis" >&2
    [ "${DERM_PROFILE:-local}" = production ] || exit 1
  }
fi

if [ "$mode" = test ]; then
  # The load benchmark's smoke run drives `wrk`; the Feast UI test drives headless Chromium.
  missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$python" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install "python3-venv" || apt_install "python$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
    "$python" -m venv .venv
  fi
fi

stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  # --no-compile: byte-compiling Feast, GE and torch up front costs most of an hour on a slow disk.
  .venv/bin/python -m pip install --no-compile -q -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# The packages are installed without byte-compiling (above); where PYTHONDONTWRITEBYTECODE is set as
# well, every process would compile the Feast, Great Expectations and torch sources it imports again
# (importing Feast: 23 s instead of 16 s here), and the suite and the job start many (CLI commands,
# servers and their workers, Ray's processes). What is imported is cached in .venv, never beside a source.
if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ] && [ -z "${PYTHONPYCACHEPREFIX:-}" ]; then
  unset PYTHONDONTWRITEBYTECODE
  export PYTHONPYCACHEPREFIX="$root/.venv/pycache"
fi

case "$mode" in
  run) shift; cd "$caller_dir"; exec "$root/.venv/bin/derm" run-all "$@" ;;  # e.g. run --events PATH
  test)
    # Every import runs with the data flow (contracts in pyproject.toml), then the suite.
    .venv/bin/lint-imports --no-cache
    # Two workers, each module on one of them (its module-scoped Redis, platform and Ray with it): one
    # process kept one core busy and left the other mostly idle while it trained, published and served.
    # Modules go out in collection order, the heavy ones first (tests/conftest.py), not by test count.
    exec .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder ;;
esac
