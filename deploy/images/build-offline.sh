#!/usr/bin/env bash
# Build the Dockerfile's images where no container registry is reachable (and no Docker daemon
# runs): a Debian bookworm base with Python 3.11 is made from Debian's own packages
# (debootstrap), stands in for the Dockerfile's base images, and buildah builds the unchanged
# Dockerfile on it. Needs root and `apt-get install buildah debootstrap`.
#
#   deploy/images/build-offline.sh gateway [TAG]  (default localhost/soberana-gateway:local)
#       python:3.11-slim replaced; ~1.5 GB of disk, ~5 minutes. Runs `soberana gateway|bench|
#       telemetry --help` in the image and checks it has no torch.
#   deploy/images/build-offline.sh engine [TAG]   (default localhost/soberana-engine:local)
#       nvidia/cuda replaced by the same base, and torch taken from PyPI, whose Linux wheel is
#       the CUDA build with the CUDA runtime as nvidia-* wheels (the host's driver comes from
#       the NVIDIA container toolkit at run time, as with the CUDA base); ~25 GB of disk while
#       building (vfs storage), ~10 GB image. Runs `soberana serve --help` in the image and
#       prints torch's CUDA build.
#
# CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt) is bind-mounted into the build only, so
# pip trusts a TLS-inspecting proxy's CA the host trusts; nothing of it stays in the image.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
target="${1:?usage: build-offline.sh engine|gateway [TAG]}"
case "$target" in engine|gateway) ;; *) echo "target must be engine or gateway" >&2; exit 2 ;; esac
tag="${2:-localhost/soberana-$target:local}"
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
if [ "$target" = gateway ]; then
  args=(--build-arg PYTHON_IMAGE="$base")
else
  args=(--build-arg CUDA_IMAGE="$base" --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
fi
"${b[@]}" build --isolation chroot --format docker --target "$target" "${args[@]}" \
  -v "$ca:/etc/ssl/certs/ca-certificates.crt:ro" -t "$tag" "$root"

ctr="$("${b[@]}" from "$tag")"
trap '"${b[@]}" rm "$ctr" >/dev/null' EXIT
if [ "$target" = gateway ]; then
  for command in gateway bench telemetry; do
    "${b[@]}" run --isolation chroot "$ctr" -- soberana "$command" --help | head -1
  done
  "${b[@]}" run --isolation chroot "$ctr" -- python -c \
    "import importlib.util as u, os; assert u.find_spec('torch') is None; print('uid', os.getuid(), 'no torch')"
else
  "${b[@]}" run --isolation chroot "$ctr" -- soberana serve --help | head -1
  "${b[@]}" run --isolation chroot "$ctr" -- python -c \
    "import os, torch, triton, soberana; print('uid', os.getuid(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
fi
"${b[@]}" inspect --format '{{.Docker.Config.Healthcheck.Test}}' "$tag"
"${b[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$tag"
