#!/usr/bin/env bash
# One command from a fresh clone to a mounted mirrorfs:
#   ./mount.sh /mnt/mfs                 4 local servers (started if needed), format if new, mount
#   ./mount.sh --count 8 /mnt/mfs       more servers; also --base-port B, --data DIR, --block-size S
#   ./mount.sh --servers h:p,... /mnt/mfs   mount an existing cluster, start nothing
#   ./mount.sh -u /mnt/mfs              unmount and stop the servers this script started
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=/dev/null
source mirrorfuse/tools/bootstrap.sh
ensure_fuse
bootstrap_venv ""
exec "$VENV/bin/python" -m mirrorfuse.tools.up "$@"
