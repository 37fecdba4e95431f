#!/usr/bin/env bash
# Build a python:3.11-slim-bookworm equivalent from a debootstrap rootfs and store it as $1 in local
# container storage. Used by `make image` when the registry base cannot be pulled (offline machines):
# Debian bookworm's own python3.11 (3.11.2) + venv + CA certificates, nothing else.
set -euo pipefail
tag=${1:?usage: build-base.sh IMAGE_TAG}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
storage=(--storage-driver "${STORAGE_DRIVER:-vfs}")
rootfs=$(mktemp -d /tmp/alignlab-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >/dev/null
chroot "$rootfs" ln -sf /usr/bin/python3.11 /usr/local/bin/python
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
ctr=$(buildah "${storage[@]}" from scratch)
buildah "${storage[@]}" copy "$ctr" "$rootfs" / >/dev/null
buildah "${storage[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 \
    --label org.opencontainers.image.description="debootstrap bookworm + python3.11 (python:3.11-slim-bookworm equivalent)" \
    "$ctr"
buildah "${storage[@]}" commit --rm "$ctr" "$tag" >/dev/null
echo "base image $tag built from a debootstrap bookworm rootfs ($mirror)"
