#!/usr/bin/env bash
# Installs the gateway in .venv and starts it: `./scripts/serve.sh --demo` to try it without a
# provider, or with GATEWAY_UPSTREAM_API_KEY (and GATEWAY_UPSTREAM_BASE_URL for a provider other
# than OpenAI) set. Arguments go to `gateway serve`. Debian's python3 may lack venv support: it
# is installed with apt-get (as root) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c "import ensurepip, venv" 2>/dev/null; then
  apt-get update
  apt-get install -y python3-venv
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# Installed once (editable: code changes need no reinstall), again when the dependencies change:
# a restart never needs the network.
if [ ! -x .venv/bin/gateway ] || [ pyproject.toml -nt .venv/.installed ] || \
    [ constraints.txt -nt .venv/.installed ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --constraint constraints.txt -e .
  touch .venv/.installed
fi
exec .venv/bin/gateway serve "$@"
