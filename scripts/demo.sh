#!/usr/bin/env bash
# Set up the environment (first run only) and run the whole pipeline on the embedded demo data.
# Extra arguments go to `fklip demo` (for example --out DIR).
source "$(dirname "$0")/env.sh"
fklip demo "$@"
