#!/usr/bin/env bash
# The main job: set up, then train + certify the default model on the embedded digits
# data set, print the certified-accuracy table and write report + plot to runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m liptorch "$@"
