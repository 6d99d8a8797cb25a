#!/usr/bin/env bash
# Run every test (unit + integration against real processes on 127.0.0.1). Sets up .venv itself.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
command -v openssl >/dev/null || echo "note: the openssl command is missing; its interop test will fail" >&2
cd "$root"
# Lint and type checks first: a finding fails the run.
"$root/.venv/bin/ruff" check plugin tests integration bench
"$root/.venv/bin/mypy" --config-file "$root/pyproject.toml"
# Run from a folder where the source tree is not importable, so the installed wheel is what is tested.
exec "$root/.venv/bin/python" -m pytest -p no:cacheprovider --rootdir "$root" -c "$root/pyproject.toml" \
  "$root/tests" "$root/integration" "$@"
