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
