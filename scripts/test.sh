#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint, type-check and run the whole test suite.
#
# `bash scripts/test.sh --fast` runs the fast set instead: every test but the end-to-end runs on
# SmolLM2 (`slow`), the tests that need PostgreSQL (`postgres`) or Chromium (`browser`), the
# kill -9 runs of real processes at seeded fault points (`faults`, tests/test_faults.py), and,
# where there is no GPU, the decode kernel's own tests in Triton's CPU interpreter (`triton`:
# several minutes of CPU; run them with -m triton when the kernel changes). It neither installs
# Chromium nor starts PostgreSQL. CI (.ci/run) runs everything. Any other arguments go to pytest
# (e.g. a test file, or -k).
#
# Chromium (the HTML report test) and PostgreSQL (the store tests on a second backend) come from
# Debian's packages when missing and this runs as root; a failed install fails this command.
# Where they cannot be installed, the tests that need them are skipped and this script says so,
# loudly, at the start and at the end (PATCHDB_REQUIRE_POSTGRES=1 makes a missing PostgreSQL fail).
# A PostgreSQL server this script starts is stopped when it exits (success, failure or Ctrl-C);
# one that was already running, or that PATCHDB_TEST_POSTGRES_URL names, is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

FAST=""
if [ "${1:-}" = "--fast" ]; then FAST=1; shift; fi
SKIPPED=()
say() { echo "test: $*" >&2; }
warn_skipped() {
  local s
  for s in "${SKIPPED[@]}"; do
    echo "test: WARNING: SKIPPED $s" >&2
  done
}
can_install() { command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; }

bash scripts/setup.sh

if [ -z "$FAST" ] && ! command -v chromium >/dev/null 2>&1; then
  if can_install; then
    say "installing chromium from Debian's packages"
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); then
      echo "Error: installing chromium failed; the HTML report test needs it" >&2
      exit 1
    fi
  else
    SKIPPED+=("the HTML report test: chromium is missing and cannot be installed here (not root, or no apt-get)")
  fi
fi

STARTED_PG=""
stop_pg() {
  if [ -n "$STARTED_PG" ]; then
    say "stopping the PostgreSQL server this script started"
    bash scripts/start_postgres.sh stop || true
    STARTED_PG=""
  fi
}
on_exit() {
  local code=$?
  stop_pg
  if [ ${#SKIPPED[@]} -gt 0 ]; then warn_skipped; fi
  exit "$code"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "$FAST" ]; then
  say "the fast set: leaving out the SmolLM2 runs, the PostgreSQL and Chromium tests and the interpreted kernel"
elif [ -z "${PATCHDB_TEST_POSTGRES_URL:-}" ]; then
  if bash scripts/start_postgres.sh running; then
    say "using the PostgreSQL server that is already running (left running afterwards)"
    PATCHDB_TEST_POSTGRES_URL=$(bash scripts/start_postgres.sh)  # prints its URL, starts nothing
  elif bash scripts/start_postgres.sh have-binaries || can_install; then
    STARTED_PG=1  # set before starting: a Ctrl-C during the start still stops it
    PATCHDB_TEST_POSTGRES_URL=$(bash scripts/start_postgres.sh)
  elif [ -n "${PATCHDB_REQUIRE_POSTGRES:-}" ]; then
    echo "Error: PostgreSQL is required (PATCHDB_REQUIRE_POSTGRES) but its server binaries are missing and cannot be installed here" >&2
    exit 1
  else
    SKIPPED+=("the PostgreSQL tests: no server binaries and they cannot be installed here (not root, or no apt-get); set PATCHDB_TEST_POSTGRES_URL to a server you run")
  fi
fi
if [ -n "${PATCHDB_TEST_POSTGRES_URL:-}" ]; then export PATCHDB_TEST_POSTGRES_URL; fi
if [ ${#SKIPPED[@]} -gt 0 ]; then warn_skipped; fi

.venv/bin/ruff check patchdb tests scripts migrations
.venv/bin/mypy patchdb
# Test processes (pytest-xdist; PATCHDB_TEST_WORKERS=1 runs them in this process), tests handed
# out as workers come free, so one long test does not leave a core idle.
# Two workers per core: many tests wait on a patchdb process or a loopback server they started,
# and a second worker per core fills those waits (on 2 cores: the whole suite 11.8 -> 11.1 min
# of pytest, the fast set 5.5 -> 4.9 min).
WORKERS=${PATCHDB_TEST_WORKERS:-$((2 * $(nproc)))}
if [ "$WORKERS" = 1 ]; then PARALLEL=(); else PARALLEL=(-n "$WORKERS" --dist worksteal); fi
SELECT=()
if [ -n "$FAST" ]; then
  LEAVE_OUT="slow or postgres or browser or faults"
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    LEAVE_OUT="$LEAVE_OUT or triton"  # interpreted on the CPU: hundreds of times slower
  fi
  SELECT=(-m "not ($LEAVE_OUT)")
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" "${SELECT[@]}" "$@"
