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
    python3 -m venv "$VENV" || { echo "could not create a virtualenv in $VENV (Debian: apt-get install python3-venv)" >&2; exit 1; }
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec" \
      || { echo "installing mirrorfs into $VENV failed" >&2; exit 1; }
    touch "$stamp"
  fi
}

# FUSE 3 from the system's packages: installed when missing and we are root.
ensure_fuse() {
  if command -v fusermount3 >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -q libfuse3.so; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing FUSE 3 (apt-get install fuse3)..." >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3; } >/dev/null \
      || { echo "could not install fuse3; install it and run again" >&2; exit 1; }
  else
    echo "FUSE 3 is missing; install it first:  sudo apt-get install fuse3" >&2
    exit 1
  fi
}
