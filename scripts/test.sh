#!/usr/bin/env bash
# The whole set-up and test run on a fresh Debian/Ubuntu machine:
#   bash scripts/test.sh [pytest arguments]
# System packages (apt, once): Debian's Chromium and a font for the browser tests
# (tests/test_app.py; Playwright never downloads a browser). Python packages go into the
# active virtualenv, else into .venv in this clone (created when missing). Nothing else is
# written outside the clone but pip's cache. Exit status: pytest's. Pytest paths are
# relative to the clone's root.
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM=${PIXELFLOW_CHROMIUM:-/usr/bin/chromium}   # overridden only by tests/test_repo.py
apt_packages=()
[ -x "$CHROMIUM" ] || apt_packages+=(chromium fonts-dejavu-core)
# Debian's python3 cannot make a virtualenv until python3-venv is installed (a failed try
# leaves a .venv without bin/activate).
if [ -z "${VIRTUAL_ENV:-}" ] && [ ! -f .venv/bin/activate ] &&
   ! python3 -c "import ensurepip" 2>/dev/null; then
  apt_packages+=(python3-venv)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "${apt_packages[@]}"
fi

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -f .venv/bin/activate ] || python3 -m venv .venv
  . .venv/bin/activate
fi

# requirements-test.txt pins the CPU build of PyTorch (torch==2.13.0).
python -m pip install --quiet -r requirements-test.txt
# Its "#no-deps PACKAGE==VERSION" lines install without dependencies (torch-fidelity without
# torchvision; see the file).
nodeps=$(sed -n 's/^#no-deps[[:space:]][[:space:]]*//p' requirements-test.txt)
if [ -n "$nodeps" ]; then
  # shellcheck disable=SC2086  # one word per pin
  python -m pip install --quiet --no-deps $nodeps
fi

exec python -m pytest -q "$@"
