#!/usr/bin/env bash
# A gateway/bench host installs without torch (issue 18): `soberana[gateway,bench]` in a fresh
# venv, then the load generator drives the gateway in front of an OpenAI-compatible endpoint
# (.ci/torch_free_smoke.py). Under a minute with a warm pip cache.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$root[gateway,bench]"
# From a folder outside the checkout, so the installed package is the one that runs.
cd "$work" && "$work/venv/bin/python" "$root/.ci/torch_free_smoke.py"
