#!/usr/bin/env bash
# `make image`: build infra/images/alignlab/Dockerfile with buildah (no daemon needed) and print the build
# time, the image size and its digest. When the registry base ($BASE) cannot be pulled, a python 3.11 base is
# built from a debootstrap bookworm rootfs first (base/build-base.sh) and passed as --build-arg BASE.
set -euo pipefail
cd "$(dirname "$0")/../.."
image=${IMAGE:?IMAGE (e.g. alignlab:0.1.0-cu130)}
base=${BASE:-python:3.11-slim-bookworm}
local_base=${LOCAL_BASE:-localhost/alignlab-base:3.11-slim-bookworm}
export CONTAINERS_CONF=$PWD/infra/images/containers.conf
buildah=(buildah --storage-driver "${STORAGE_DRIVER:-vfs}")
start=$(date +%s)
if ! timeout 60 "${buildah[@]}" pull --quiet "$base" >/dev/null 2>&1; then
    echo "cannot pull $base: using $local_base (debootstrap bookworm + python3.11)"
    "${buildah[@]}" inspect --type image "$local_base" >/dev/null 2>&1 || infra/images/base/build-base.sh "$local_base"
    base=$local_base
fi
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
# The host's CA bundle reaches pip as a build secret (proxies that re-sign TLS), never as a layer.
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
secret=(); [ -s "$ca" ] && secret=(--secret "id=ca,src=$ca")
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
"${buildah[@]}" bud --isolation chroot --layers=false "${secret[@]}" -f infra/images/alignlab/Dockerfile \
    --build-arg BASE="$base" --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    -t "$image" .
end=$(date +%s)
size=$(podman --storage-driver "${STORAGE_DRIVER:-vfs}" image inspect --format "{{.Size}}" "$image")
digest=$(podman --storage-driver "${STORAGE_DRIVER:-vfs}" image inspect --format '{{.Digest}}' "$image")
echo "image:      $image (base $base, revision $revision)"
echo "build time: $((end - start)) s"
echo "size:       $(numfmt --to=iec-i --suffix=B "$size" 2>/dev/null || echo "$size bytes")"
echo "digest:     $digest"
