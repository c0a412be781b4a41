#!/usr/bin/env bash
# Set up the environment (first run only) and run the test suite.
# Extra arguments go to pytest (for example -k archive).
source "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
