#!/usr/bin/env bash
# Set up (if needed) and start the LeMoE server on the configuration in config/ (port 11435).
# Extra arguments go to api_server.py: --config FILE, --host H, --port P, --workers N, --dev.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
exec venv/bin/python api_server.py "$@"
