#!/usr/bin/env bash
# The main job: a complete local deployment on loopback (MEF + ACME CSE with the plugin + an AE that
# enrols and registers), printed step by step. Sets up .venv itself.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/rspf" demo --workdir "$root/run/demo" "$@"
