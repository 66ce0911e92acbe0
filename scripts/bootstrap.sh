#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian machine, idempotently:
# the PostgreSQL server binaries (Debian package `postgresql`, as root), a virtualenv
# in .venv with the project and its pinned dependencies. Safe to run every time:
# it only installs what is missing or what pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "bootstrap: $*" >&2; }

have_pg_server() {
  { command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; } && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

if ! have_pg_server; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    say "installing the postgresql package (server binaries for the local clusters)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
  else
    say "PostgreSQL server binaries (initdb, pg_ctl) are missing."
    say "Install them with: sudo apt-get install -y postgresql"
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "Python 3.11 or newer is needed (found $("$PYTHON" --version 2>&1))"
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  say "installing the project and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
