#!/usr/bin/env bash
# Build cellserve's serving images with podman, without any container registry:
#
#   1. a minimal Debian bookworm root (python3, python3-venv, ca-certificates) made with debootstrap from
#      the Debian mirror, imported as the local base image localhost/cellserve-base:bookworm-<recipe>
#      (cached: built again only when this recipe changes, or with CELLSERVE_BASE_REFRESH=1);
#   2. the Dockerfile's CPU variant on that base      -> cellserve:<version>-cpu
#   3. its GPU variant on the same base, with the CUDA runtime, cuBLAS and cuDNN from NVIDIA's wheels
#      (--build-arg CUDA_LIBS=wheels)                    -> cellserve:<version>-gpu
#
# Usage: deploy/image/build.sh [--print-tags]
# Linux, root and podman (apt-get install podman runc debootstrap) are needed; without them it prints one
# line "skip: <reason>" and exits 3. On success its last lines are key=value (images, containers.conf),
# what tests/deploy/test_image.py reads. Nothing of the host's pip configuration goes into a build; the
# host's CA bundle is bind-mounted read-only while pip runs (pip may sit behind a TLS-inspecting proxy),
# never copied into an image.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml" | head -n 1)"
CPU_IMAGE="cellserve:${VERSION}-cpu"
GPU_IMAGE="cellserve:${VERSION}-gpu"
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates
MIRROR="${CELLSERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE="${CELLSERVE_IMAGE_CACHE:-/var/cache/cellserve-ci}"
HOST_CA=/etc/ssl/certs/ca-certificates.crt

if [ "${1:-}" = --print-tags ]; then
  printf 'cpu_image=%s\ngpu_image=%s\n' "$CPU_IMAGE" "$GPU_IMAGE"
  exit 0
fi

skip() { echo "skip: $*"; exit 3; }
[ "$(uname -s)" = Linux ] || skip "container images are built on Linux only (this is $(uname -s))"
[ "$(id -u)" = 0 ] || skip "needs root (rootful podman and debootstrap); running as uid $(id -u)"
for tool in podman debootstrap runc; do
  command -v "$tool" >/dev/null || skip "$tool not installed (apt-get install podman runc debootstrap)"
done

mkdir -p "$CACHE"
# crun refuses this sandbox's hybrid cgroup layout, and podman's default ulimits exceed what the host allows:
# runc, with nofile at the host's hard limit and nproc 32768. Our own containers.conf, the host's untouched.
nofile="$(ulimit -Hn)"
[ "$nofile" = unlimited ] && nofile=1048576
export CONTAINERS_CONF="$CACHE/containers.conf"
cat > "$CONTAINERS_CONF.tmp" <<CONF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"
podman_error="$(podman info --format '{{.Host.OCIRuntime.Name}}' 2>&1 >/dev/null)" \
  || skip "podman does not work here: $(printf '%s' "$podman_error" | head -n 1)"

# One build at a time on this machine (CI and engineers share the cache and podman's storage).
exec 9>"$CACHE/build.lock"
flock -w 1800 9 || { echo "another build held $CACHE/build.lock for 30 minutes" >&2; exit 1; }

log() { printf '%s build.sh: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---- 1. the Debian base ------------------------------------------------------------------------------
recipe="$(printf '%s\n' "$SUITE" "$BASE_PACKAGES" "$(sed -n '/^make_base()/,/^}/p' "$0")" | sha256sum | cut -c1-12)"
BASE_IMAGE="localhost/cellserve-base:${SUITE}-${recipe}"

make_base() {
  local root="$1"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -n 20 "$root.log" >&2; return 1; }
  # What debootstrap takes from the host or leaves behind: resolver, host name, logs, apt caches and lists.
  # The sources name Debian's public mirror whatever mirror was used (no host mirror in the image).
  printf 'deb http://deb.debian.org/debian %s main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
    "$SUITE" "$SUITE" > "$root/etc/apt/sources.list"
  : > "$root/etc/resolv.conf"
  : > "$root/etc/hostname"
  : > "$root/etc/machine-id"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/var/log/* "$root"/tmp/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
  find "$root/usr/share/doc" -type f ! -name copyright -delete
}

if [ "${CELLSERVE_BASE_REFRESH:-}" = 1 ] || ! podman image exists "$BASE_IMAGE"; then
  log "debootstrap $SUITE ($BASE_PACKAGES) from $MIRROR -> $BASE_IMAGE"
  work="$(mktemp -d "$CACHE/base.XXXXXX")"
  trap 'rm -rf "$work" "$work.log"' EXIT
  make_base "$work/root"
  tar -C "$work/root" --numeric-owner -c . \
    | podman import --change 'CMD ["/usr/bin/python3"]' --change 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
  rm -rf "$work" "$work.log"
  trap - EXIT
else
  log "base $BASE_IMAGE (cached)"
fi

# ---- 2./3. the images --------------------------------------------------------------------------------
# --pull=never: every FROM is the local base; --format docker: OCI images cannot carry a HEALTHCHECK. The build sees no host environment (podman passes none) and
# no host pip configuration; only the CA bundle, read-only, at the path Debian's pip reads it from.
build() {
  local tag="$1"; shift
  log "podman build $tag $*"
  podman build --pull=never --layers --format docker \
    --volume "$HOST_CA:/etc/ssl/certs/ca-certificates.crt:ro" \
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
    --build-arg "VERSION=$VERSION" \
    --build-arg "REVISION=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$@" --tag "$tag" --file "$REPO/Dockerfile" "$REPO" >&2
}
# Each variant's `deps` stage (its third-party packages, 3 GB for GPU) is tagged too: a tagged image's layers
# survive the prune below, so the next build reuses them until pyproject.toml changes.
for variant in cpu gpu; do
  args=(--build-arg "VARIANT=$variant")
  [ "$variant" = gpu ] && args+=(--build-arg CUDA_LIBS=wheels)
  tag="$CPU_IMAGE"
  [ "$variant" = gpu ] && tag="$GPU_IMAGE"
  build "localhost/cellserve-build:deps-$variant" "${args[@]}" --target deps
  build "$tag" "${args[@]}"
done

# Untagged layers (a previous revision's wheel, app and runtime layers) go; the tagged ones' stay.
podman image prune --force >/dev/null

printf 'base_image=%s\ncpu_image=%s\ngpu_image=%s\ncontainers_conf=%s\n' \
  "$BASE_IMAGE" "$CPU_IMAGE" "$GPU_IMAGE" "$CONTAINERS_CONF"
