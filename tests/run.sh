#!/usr/bin/env bash
# The one test command: sets up what it needs on a fresh machine, then runs pytest.
#   tests/run.sh            default run (real servers, real kills; minutes)
#   tests/run.sh --slow     also the long soak tests
#   tests/run.sh -k NAME    any other arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
source mirrorfuse/tools/bootstrap.sh
ensure_fuse
# tools the mount tests drive, as a user would: rsync, setfattr/getfattr, git
need=()
command -v rsync >/dev/null || need+=(rsync)
command -v setfattr >/dev/null || need+=(attr)
command -v git >/dev/null || need+=(git)
# the LAN of network namespaces (tests/lan.py): ip, nft (cuts, loss), faketime (clocks)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null || need+=(faketime)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >/dev/null
  else
    echo "the tests need: ${need[*]} (sudo apt-get install ${need[*]})" >&2; exit 1
  fi
fi
bootstrap_venv test
marker=(-m "not slow")
args=()
for a in "$@"; do
  if [ "$a" = "--slow" ]; then marker=(-m "slow or not slow"); else args+=("$a"); fi
done
# style and types first: a minute of pytest is not spent on code that does not check
"$VENV/bin/ruff" check mirrorfuse servers tests bench
"$VENV/bin/ruff" format --check --quiet mirrorfuse servers tests bench \
  || { echo "ruff format --check: run .venv/bin/ruff format mirrorfuse servers tests bench" >&2; exit 1; }
"$VENV/bin/mypy" --no-error-summary || { echo "mypy found type errors (above)" >&2; exit 1; }
exec "$VENV/bin/python" -m pytest -p no:cacheprovider --durations=10 "${marker[@]}" "${args[@]}"
