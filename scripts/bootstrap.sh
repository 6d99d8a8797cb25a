#!/usr/bin/env bash
# Create .venv (if missing) and install this project into it (a real wheel install, not editable,
# so tests and demos run the package exactly as users get it). Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
  "$py" -m venv "$root/.venv"
fi
"$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
"$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$root" 2>&1 \
  | grep -v "^WARNING: Location" || true
"$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check "$root[test,postgres]" 2>&1 \
  | grep -v "^WARNING: Location" || true
"$root/.venv/bin/python" -c "import rspf, OpenSSL, jsonschema, click, acmecse, psycopg, psycopg_pool" \
  || { echo "bootstrap: the install is incomplete" >&2; exit 1; }
