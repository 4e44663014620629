#!/usr/bin/env bash
# Build the project's Docker images on a machine without an image registry (as root):
#   scripts/docker_local.sh [cpu|gpu|all]        (default: all; prints each image's tag)
# 1. installs and starts the Docker engine when none answers (Debian's docker.io; dockerd in the
#    background, its log in /var/log/dockerd.log);
# 2. makes the base image once, cached by its tag (mcl-base:bookworm): debootstrap a minimal
#    Debian 12 with Python 3.11 and venv from the Debian mirror apt uses on a Debian host
#    (else deb.debian.org, or $MCL_DEBIAN_MIRROR), `docker import`;
# 3. builds mcl:cpu and mcl:gpu FROM it (docker/Dockerfile.*, build arg BASE), with BuildKit so
#    that the host's CA bundle (when pip is configured with one: a TLS proxy of its own) reaches
#    pip as a build secret, never a layer of the image. Layers are cached between runs.
# Elsewhere (a laptop, a cloud CI with Docker Hub) plain `docker build -f docker/Dockerfile.cpu .`
# builds on the public python:3.11-slim-bookworm instead.
set -euo pipefail
cd "$(dirname "$0")/.."

which_images=${1:-all}
case "$which_images" in cpu|gpu|all) ;; *) echo "usage: $0 [cpu|gpu|all]" >&2; exit 2 ;; esac
BASE_TAG=${MCL_DOCKER_BASE:-mcl-base:bookworm}

engine_up() { docker info >/dev/null 2>&1; }
if ! engine_up; then
  if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
  fi
  if ! engine_up; then
    nohup dockerd >/var/log/dockerd.log 2>&1 &
    for _ in $(seq 60); do engine_up && break; sleep 1; done
    engine_up || { echo "docker_local.sh: dockerd did not start (see /var/log/dockerd.log)" >&2; exit 1; }
  fi
fi

# A client that builds with BuildKit (for the CA secret): buildx if installed, else a client with
# BuildKit built in (Debian's docker.io ships one as /usr/bin/docker).
if docker buildx version >/dev/null 2>&1; then
  build() { docker buildx build --load "$@"; }
else
  client=docker
  [ -x /usr/bin/docker ] && client=/usr/bin/docker
  build() { DOCKER_BUILDKIT=1 "$client" build "$@"; }
fi

if ! docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null 2>&1 || {
    apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  mirror=""
  if grep -qx 'ID=debian' /etc/os-release 2>/dev/null; then  # a Debian host: the mirror its apt uses
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '/^deb / && $2 ~ /^http/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  fi
  mirror=${MCL_DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}
  rootfs=$(mktemp -d /var/tmp/mcl-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "docker_local.sh: debootstrap bookworm from $mirror" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm \
    "$rootfs" "$mirror" >/var/log/mcl-debootstrap.log 2>&1 ||
    { echo "docker_local.sh: debootstrap failed (see /var/log/mcl-debootstrap.log)" >&2; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$BASE_TAG" >/dev/null
  rm -rf "$rootfs"; trap - EXIT
fi

# pip's CA bundle on this host, if one is configured (pip's own setting, then the usual variables)
ca=$(pip config get global.cert 2>/dev/null || true)
ca=${ca:-${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-}}}}
secret=()
[ -n "$ca" ] && [ -s "$ca" ] && secret=(--secret "id=ca,src=$ca")
# the host's proxy, if any (Docker passes these build args to RUN without an ARG line)
for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  [ -n "${!var:-}" ] && secret+=(--build-arg "$var=${!var}")
done

for kind in cpu gpu; do
  [ "$which_images" = all ] || [ "$which_images" = "$kind" ] || continue
  echo "docker_local.sh: building mcl:$kind on $BASE_TAG" >&2
  build -f "docker/Dockerfile.$kind" --build-arg "BASE=$BASE_TAG" "${secret[@]}" -t "mcl:$kind" --progress plain . \
    >"/var/log/mcl-docker-build-$kind.log" 2>&1 ||
    { tail -20 "/var/log/mcl-docker-build-$kind.log" >&2
      echo "docker_local.sh: building mcl:$kind failed (log: /var/log/mcl-docker-build-$kind.log)" >&2; exit 1; }
  echo "mcl:$kind"
done
docker image prune -f >/dev/null 2>&1 || true  # the images a rebuild replaced (their layers stay cached)
