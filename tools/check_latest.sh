#!/usr/bin/env bash
# The guard against drift (not part of CI): install the newest release of every direct dependency in a throwaway
# virtual environment and run the test suite there. Prints the versions it got and pytest's summary line; a failure
# here is what the next pin bump has to fix first.
#   bash tools/check_latest.sh [pytest arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# the names of requirements.txt without their pins; torch stays at its pin unless LATEST_TORCH=1 (a newer torch is
# a CUDA build of several GB)
names=$(grep -vE '^\s*(#|$)' requirements.txt | sed -E 's/[=<>!~ ].*//' | grep -vx torch)
if [ "${LATEST_TORCH:-0}" = 1 ]; then names="torch $names"
else "$venv/bin/python" -m pip install -q "$(grep -E '^torch==' requirements.txt)" || exit 1; fi
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q --upgrade $names || exit 1
echo "newest releases:"
"$venv/bin/python" -m pip list --format freeze | grep -iE "^($(echo $names torch | tr ' ' '|'))=="
PATH="$venv/bin:$PATH" python -m pytest -q "$@"
