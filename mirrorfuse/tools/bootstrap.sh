# Sourced by mount.sh and tests/run.sh: make the project's virtualenv on a fresh machine.
# Sets VENV. Installs the project (editable) with the extras named in $1, once.
VENV="${MIRRORFS_VENV:-$PWD/.venv}"
bootstrap_venv() {
  local extras="${1:-}" stamp spec
  spec="."
  [ -n "$extras" ] && spec=".[$extras]"
  stamp="$VENV/.mirrorfs-installed-${extras:-base}"
  if [ ! -x "$VENV/bin/python" ]; then
    command -v python3 >/dev/null || { echo "python3 is needed (3.11 or newer)" >&2; exit 1; }
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || { echo "mirrorfs needs Python 3.11 or newer; python3 is $(python3 -V 2>&1)" >&2; exit 1; }
    python3 -m venv "$VENV" || { echo "could not create a virtualenv in $VENV (Debian: apt-get install python3-venv)" >&2; exit 1; }
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # one install at a time: two mount.sh started together would both run pip on one .venv
    if command -v flock >/dev/null 2>&1; then exec 9>"$VENV/.mirrorfs-install.lock"; flock 9; fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then  # not done meanwhile
      # pyfuse3 is compiled against libfuse3 here; -O1 halves that (its C is glue)
      CFLAGS="${CFLAGS:--O1}" "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec" \
        || { echo "installing mirrorfs into $VENV failed" >&2; exit 1; }
      touch "$stamp"
    fi
    exec 9>&-
  fi
  # every command starts by importing the package: compiled once here, as a wheel's
  # install does, it starts in 0.15 s instead of 0.4 s where PYTHONDONTWRITEBYTECODE is
  # set (each start would compile what it imports); up-to-date files are skipped
  "$VENV/bin/python" -m compileall -q -j 0 mirrorfuse servers >/dev/null 2>&1 || true
}

# FUSE 3 from the system's packages, and what building pyfuse3 (libfuse's Python
# binding) against it needs: installed when missing and we are root.
ensure_fuse() {
  local need=()
  # grep reads all of ldconfig's list (no -q): with pipefail, ldconfig cut off by SIGPIPE
  # would count as FUSE missing
  command -v fusermount3 >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep libfuse3.so >/dev/null \
    || need+=(fuse3)
  command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
  pkg-config --exists fuse3 2>/dev/null || need+=(libfuse3-dev)
  command -v gcc >/dev/null 2>&1 || need+=(gcc)
  python3 -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    2>/dev/null || need+=(python3-dev)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need[*]} (apt-get)..." >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >/dev/null \
      || { echo "could not install ${need[*]}; install them and run again" >&2; exit 1; }
  else
    echo "mirrorfs needs: ${need[*]}; install them first:  sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
}
