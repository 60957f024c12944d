#!/usr/bin/env bash
# The suite against the newest releases that setup.py's ranges allow (torch stays at 2.13.0), in a fresh venv,
# so a breaking upstream release is found here first. Not part of CI: constraints.txt pins what CI installs.
# Usage: bash scripts/check_latest.sh [pytest args]   (from the repository root; the venv goes to a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade --upgrade-strategy eager torch==2.13.0 -e ".[test]"
echo "== versions that differ from constraints.txt (installed vs pinned):"
"$venv/bin/pip" freeze --exclude-editable | sed 's/+cpu$//' | sort | comm -23 - <(sort constraints.txt) || true
"$venv/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
