#!/usr/bin/env bash
# Run the test suite: installs the environment on first use (scripts/setup_env.sh
# --test), then runs pytest. Extra arguments go to pytest, e.g. `-m slow` for the
# longer checks that the default run leaves out.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh --test
. ./path.sh
exec python -m pytest "$@"
