#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian 12 machine, then
# run the whole suite: lint, type check, unit tests and real-peer tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "test: ruff"
python3 -m ruff check src tests fuzz
python3 -m ruff format --check src tests fuzz
echo "test: mypy --strict"
python3 -m mypy
echo "test: pytest"
python3 -m pytest -q "$@"
