#!/usr/bin/env bash
# Create (or reuse) .venv and install requirements.txt into it when it changed. Sourced by the
# demo and test scripts; prints nothing when the environment is already up to date.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
python_bin="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv" >&2
  "$python_bin" -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$repo/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing requirements into $venv (the first time takes a few minutes)" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$repo/requirements.txt" >&2
  echo "$want" > "$stamp"
fi
