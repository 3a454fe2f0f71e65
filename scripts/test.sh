#!/usr/bin/env bash
# The test command: installs what the tests need, makes sure Postgres and Redis are up, and runs
# the whole suite (unit, integration against the real services, end to end with real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/services.sh
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$status"
