#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint, type-check and run the whole test suite.
# Chromium (for the HTML report test) comes from Debian's packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "test: installing chromium from Debian's packages"
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "test: chromium not installed; the HTML test will be skipped"
fi
.venv/bin/ruff check patchdb tests scripts migrations
.venv/bin/mypy patchdb
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
