#!/usr/bin/env bash
# One provisioning script for `make run`, `make test` and CI.
# Installs Debian packages, builds the TimescaleDB Apache-2 edition from Debian's own source
# package (cached: skipped when the extension is already installed), and creates the virtual
# environment from the pinned requirements (skipped when the lock file has not changed).
# Idempotent; the second run takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${UB_CACHE_DIR:-$ROOT/.cache}"
VENV="${UB_VENV:-$ROOT/.venv}"
PG_MAJOR=15
PYTHON="${PYTHON:-python3}"

log() { printf '[provision] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

APT_PACKAGES=(
  "postgresql-$PG_MAJOR" "postgresql-server-dev-$PG_MAJOR" postgresql-client-$PG_MAJOR
  redis-server redis-tools cmake gcc g++ make dpkg-dev libssl-dev
  poppler-utils
)

install_apt_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "Debian packages present"
    return
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packaged services must not grab the default ports; the suite runs its own instances.
  as_root systemctl disable --now redis-server >/dev/null 2>&1 || true
  if command -v service >/dev/null; then as_root service redis-server stop >/dev/null 2>&1 || true; fi
}

timescaledb_installed() {
  local sharedir
  sharedir="$(/usr/lib/postgresql/$PG_MAJOR/bin/pg_config --sharedir)"
  ls "$sharedir"/extension/timescaledb--*.sql >/dev/null 2>&1 \
    && ls "$(/usr/lib/postgresql/$PG_MAJOR/bin/pg_config --pkglibdir)"/timescaledb-*.so >/dev/null 2>&1
}

build_timescaledb() {
  if timescaledb_installed; then
    log "TimescaleDB extension present"
    return
  fi
  local src="$CACHE/timescaledb-src" apt_dir="$CACHE/apt-trixie-src"
  mkdir -p "$src" "$apt_dir/lists/partial"
  # A private sources list keeps the system's apt configuration untouched.
  cat >"$apt_dir/sources.list" <<LIST
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
LIST
  local apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$apt_dir/lists" -o "APT::Sandbox::User=root")
  if ! ls "$src"/timescaledb-*/CMakeLists.txt >/dev/null 2>&1; then
    log "fetching Debian's timescaledb source package (trixie)"
    apt-get "${apt_opts[@]}" update -qq
    (cd "$src" && apt-get "${apt_opts[@]}" source -qq timescaledb >/dev/null)
  fi
  local dir
  dir="$(ls -d "$src"/timescaledb-*/ | head -n1)"
  log "building TimescaleDB (Apache-2 edition) in $dir"
  (
    cd "$dir"
    rm -rf build && mkdir build && cd build
    cmake .. -DAPACHE_ONLY=1 -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
      -DPG_CONFIG="/usr/lib/postgresql/$PG_MAJOR/bin/pg_config" -DCMAKE_BUILD_TYPE=Release >/dev/null
    make -j"$(nproc)" >/dev/null
    as_root make install >/dev/null
  )
  timescaledb_installed || { log "TimescaleDB install failed"; exit 1; }
  log "TimescaleDB installed"
}

create_venv() {
  local lock="$ROOT/requirements.lock" stamp="$VENV/.requirements.sha256"
  local want
  want="$(sha256sum "$lock" | cut -d' ' -f1)"
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    log "virtual environment up to date"
    return
  fi
  log "creating virtual environment $VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$lock"
  echo "$want" >"$stamp"
}

install_apt_packages
build_timescaledb
create_venv
log "done"
