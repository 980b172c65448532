#!/usr/bin/env bash
# The one test command: sets up what it needs on a fresh machine, then runs pytest.
#   tests/run.sh            default run (real servers, real kills; minutes)
#   tests/run.sh --slow     also the long soak tests
#   tests/run.sh -k NAME    any other arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
source scripts/bootstrap.sh
bootstrap_venv test
marker=(-m "not slow")
args=()
for a in "$@"; do
  if [ "$a" = "--slow" ]; then marker=(-m "slow or not slow"); else args+=("$a"); fi
done
"$VENV/bin/ruff" check mirrorfuse servers tests bench
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "${marker[@]}" "${args[@]}"
