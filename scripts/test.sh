#!/usr/bin/env bash
# Run the test suite: sets up (or reuses) .venv, then pytest. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_venv.sh"
bash "$repo/scripts/install_browser.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest -q "$@" tests
