#!/usr/bin/env bash
# Build the Dockerfile's slim `gateway` image where no container registry is reachable (and
# no Docker daemon runs): a Debian bookworm base with Python 3.11 is made from Debian's own
# packages (debootstrap), stands in for python:3.11-slim, and buildah builds the unchanged
# Dockerfile on it. Needs root, `apt-get install buildah debootstrap`, ~1.5 GB of disk and
# about 5 minutes. Then it runs `soberana gateway|bench|telemetry --help` in the image.
#
#   deploy/images/build-gateway-offline.sh [TAG]        (default localhost/soberana-gateway:local)
#
# CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt) is bind-mounted into the build only, so
# pip trusts a TLS-inspecting proxy's CA the host trusts; nothing of it stays in the image.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
tag="${1:-localhost/soberana-gateway:local}"
base=localhost/debian-python:bookworm-3.11
ca="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
b=(buildah --storage-driver vfs)

if ! "${b[@]}" inspect "$base" >/dev/null 2>&1; then
  rootfs="$(mktemp -d)"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror"
  # What python:3.11-slim gives that Debian's python3 does not: `python`, and pip allowed to
  # install into the image's interpreter (PEP 668's marker removed).
  rm -f "$rootfs"/usr/lib/python3.11/EXTERNALLY-MANAGED "$rootfs"/var/cache/apt/archives/*.deb
  ln -sf python3 "$rootfs/usr/bin/python"
  ctr="$("${b[@]}" from scratch)"
  "${b[@]}" copy "$ctr" "$rootfs" / >/dev/null
  "${b[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd python3 "$ctr"
  "${b[@]}" commit -q --rm "$ctr" "$base" >/dev/null
  rm -rf "$rootfs"
fi

# --format docker keeps the HEALTHCHECK (the OCI image format has none).
"${b[@]}" build --isolation chroot --format docker --target gateway \
  --build-arg PYTHON_IMAGE="$base" -v "$ca:/etc/ssl/certs/ca-certificates.crt:ro" \
  -t "$tag" "$root"

ctr="$("${b[@]}" from "$tag")"
trap '"${b[@]}" rm "$ctr" >/dev/null' EXIT
for command in gateway bench telemetry; do
  "${b[@]}" run --isolation chroot "$ctr" -- soberana "$command" --help | head -1
done
"${b[@]}" run --isolation chroot "$ctr" -- python -c \
  "import importlib.util as u, os; assert u.find_spec('torch') is None; print('uid', os.getuid(), 'no torch')"
"${b[@]}" inspect --format '{{.Docker.Config.Healthcheck.Test}}' "$tag"
