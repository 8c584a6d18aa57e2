#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster for the tests (idempotent), and print its URL.
#
#   bash scripts/start_postgres.sh          # start (or find running) and print the admin URL
#   bash scripts/start_postgres.sh stop     # stop it and delete its folder
#   bash scripts/start_postgres.sh running  # exit 0 if it is running (starts nothing)
#   bash scripts/start_postgres.sh have-binaries  # exit 0 if initdb and pg_ctl are installed
#
# The cluster lives in $PATCHDB_PG_DIR (default: $TMPDIR/patchdb-postgres), listens on 127.0.0.1
# only, on a free port, with trust authentication for the superuser "postgres". Its URL is
# written to $PATCHDB_PG_DIR/url, where tests/pg.py reads it. Data is not fsynced: this is for
# tests, never for results you want to keep.
#
# PostgreSQL refuses to run as root, so as root the server runs as the "postgres" user. When the
# server binaries are missing and we are root on Debian, they are installed from Debian's
# packages (apt-get install postgresql). A start that fails or is interrupted stops the server
# it had started; a running server is stopped only by `stop` (scripts/test.sh calls it on exit).
set -euo pipefail
DIR=${PATCHDB_PG_DIR:-${TMPDIR:-/tmp}/patchdb-postgres}
DATA=$DIR/data
CMD=${1:-start}

find_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
    dirname "$(command -v pg_ctl)"; return 0
  fi
  return 1
}

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

is_running() {
  [ -f "$DIR/url" ] && [ -f "$DIR/port" ] \
    && "$BIN/pg_isready" -q -h 127.0.0.1 -p "$(cat "$DIR/port")" 2>/dev/null
}

BIN=$(find_bin || true)
case "$CMD" in
  have-binaries) [ -n "$BIN" ]; exit ;;
  running) [ -n "$BIN" ] && is_running; exit ;;
  stop)
    if [ -n "$BIN" ] && [ -d "$DATA" ]; then
      as_owner "$BIN/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1 || true
    fi
    rm -rf "$DIR"
    exit 0 ;;
  start) ;;
  *) echo "start_postgres: unknown command $CMD (start, stop, running, have-binaries)" >&2; exit 2 ;;
esac
if [ -z "$BIN" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "start_postgres: installing postgresql from Debian's packages" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  BIN=$(find_bin || true)
fi
if [ -z "$BIN" ]; then
  echo "start_postgres: PostgreSQL server binaries (initdb, pg_ctl) not found" >&2
  exit 1
fi

# Already running? Then print its URL and stop here.
if is_running; then
  cat "$DIR/url"
  exit 0
fi

mkdir -p "$DIR"
if [ "$(id -u)" = 0 ]; then chown postgres: "$DIR"; fi
chmod 700 "$DIR"
if [ ! -f "$DATA/PG_VERSION" ]; then
  rm -rf "$DATA"
  as_owner "$BIN/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$DIR/initdb.log" 2>&1 \
    || { cat "$DIR/initdb.log" >&2; exit 1; }
fi
# A stale server of ours (its port taken by something else, say) is stopped first.
as_owner "$BIN/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1 || true

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT=""
for _ in $(seq 1 50); do
  candidate=$(( 20000 + RANDOM % 30000 ))
  if port_free "$candidate"; then PORT=$candidate; break; fi
done
[ -n "$PORT" ] || { echo "start_postgres: no free port found" >&2; exit 1; }

# From here until the URL is written, a failure or Ctrl-C stops the server this run started.
started_ok=""
cleanup() {
  if [ -z "$started_ok" ]; then as_owner "$BIN/pg_ctl" -D "$DATA" -m immediate stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
as_owner "$BIN/pg_ctl" -D "$DATA" -l "$DIR/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
  start >/dev/null || { tail -20 "$DIR/server.log" >&2; exit 1; }
echo "$PORT" >"$DIR/port"
echo "postgresql://postgres@127.0.0.1:$PORT/postgres" >"$DIR/url"
started_ok=1
cat "$DIR/url"
