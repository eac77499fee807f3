#!/usr/bin/env bash
# Build the project as a wheel, install it in a fresh venv and check that the native CPU
# kernels build from what the wheel ships (a non-editable install once lacked the headers).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel -q --no-deps "$root" -w "$work/dist"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0
wheel="$(ls "$work"/dist/soberana-*.whl)"
"$work/venv/bin/pip" install -q "${wheel}[serve]"  # the engine's extra (torch kept at 2.13.0)
cd "$work" && SOBERANA_CACHE="$work/cache" "$work/venv/bin/python" "$root/.ci/installed_smoke.py"
