#!/usr/bin/env bash
# The container image, built and checked with buildah (no Docker daemon needed; tests/test_image.py runs both).
# Usage:
#   scripts/image.sh build [--gpu]     deploy/docker/Dockerfile -> $IMAGE (default localhost/embedding-service:0.1.0-cpu,
#                                      with --gpu ...:0.1.0-cuda, torch's CUDA build)
#   scripts/image.sh check [REPORT]    runs the image's default command and probes it (scripts/image_check.py);
#                                      REPORT: where to write its findings as JSON
#   scripts/image.sh standin           the local stand-in for the Dockerfile's FROM image (below)
# The FROM image: BASE_IMAGE if set; else the official Python image the Dockerfile names, pulled from docker.io;
# where no registry answers, a stand-in made here with debootstrap from Debian's packages (bookworm's python3 in
# a virtual environment at /usr/local, where the official image has its python3 and pip), said so in the output.
# Inside the build pip gets what this machine's pip has (its index, find-links and CA bundle from `pip config
# list`), mounted read-only; nothing of that lands in the image.
# buildah and debootstrap are installed with apt where missing (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKERFILE=deploy/docker/Dockerfile
OFFICIAL_BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' "$DOCKERFILE")
STANDIN=localhost/python-standin:3.11-slim-bookworm
WORK=${IMAGE_WORK_DIR:-/var/tmp/embedding-service-image}
CPU_INDEX=$(sed -n 's/^ARG TORCH_INDEX_URL=//p' "$DOCKERFILE")
CUDA_INDEX=https://download.pytorch.org/whl/cu128

say() { echo "image.sh: $*" >&2; }

need_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [[ ${#missing[@]} -eq 0 ]] && return
  say "installing ${missing[*]} with apt"
  if [[ $(id -u) -ne 0 ]]; then say "cannot install ${missing[*]}: not root"; exit 3; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >&2 || { apt-get update -q >&2 && apt-get install -y -q "${missing[@]}" >&2; } \
    || { say "apt could not install ${missing[*]}"; exit 3; }
}

# The first Debian mirror this machine's apt names (its sources may point at a local one).
debian_mirror() {
  local uri
  uri=$(grep -rhoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

standin() {
  if buildah inspect --type image "$STANDIN" >/dev/null 2>&1; then say "stand-in $STANDIN already made"; return; fi
  local root="$WORK/standin-rootfs" ctr mnt
  rm -rf "$root" && mkdir -p "$WORK"
  say "making $STANDIN with debootstrap (Debian bookworm, $(debian_mirror))"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$(debian_mirror)" >&2
  chroot "$root" python3 -m venv /usr/local
  chroot "$root" /usr/local/bin/python3 -m pip --version >&2
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* "$root"/tmp/*
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  cp -a "$root"/. "$mnt"/
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 --label "org.opencontainers.image.description=local stand-in for $OFFICIAL_BASE" "$ctr"
  buildah commit -q --rm "$ctr" "$STANDIN" >/dev/null
  rm -rf "$root"
}

base_image() {
  if [[ -n "${BASE_IMAGE:-}" ]]; then say "FROM $BASE_IMAGE (BASE_IMAGE)"; echo "$BASE_IMAGE"; return; fi
  if timeout 90 buildah pull -q "docker.io/library/$OFFICIAL_BASE" >/dev/null 2>"$WORK/pull.log"; then
    say "FROM docker.io/library/$OFFICIAL_BASE (the Dockerfile's own)"; echo "docker.io/library/$OFFICIAL_BASE"; return
  fi
  say "no registry reachable (pulling docker.io/library/$OFFICIAL_BASE failed: $(tail -n1 "$WORK/pull.log"))"
  say "building FROM a LOCAL STAND-IN for $OFFICIAL_BASE: $STANDIN (Debian bookworm's python3, made by debootstrap)"
  standin
  echo "$STANDIN"
}

# pip's configuration on this machine, for the build: its indexes and find-links (local folders mounted as they
# are), its CA bundle; not its constraints (the Dockerfile pins with its own). With --gpu no find-links: a local
# CPU wheel of torch must not stand in for the CUDA one.
pip_mounts() {
  local gpu=$1 conf="$WORK/pip.conf" key value path
  MOUNTS=()
  echo "[global]" >"$conf"
  while IFS='=' read -r key value; do
    value=${value#\'}; value=${value%\'}
    case "$key" in
      constraint|disable-pip-version-check|default-timeout) continue ;;
      find-links) [[ $gpu == 1 ]] && continue ;;
      cert) MOUNTS+=(-v "$value:/run/host-pip/ca.crt:ro"); value=/run/host-pip/ca.crt ;;
    esac
    for path in $value; do
      path=${path#file://}; path=${path%/}
      [[ $path == */simple ]] && path=${path%/simple}  # a local index: its files lie beside simple/
      [[ $path == /* && -e $path && $path != /run/host-pip/* ]] && MOUNTS+=(-v "$path:$path:ro")
    done
    echo "$key = $value" >>"$conf"
  done < <(python3 -m pip config list 2>/dev/null | sed 's/^[^.]*\.//' | sort -u -t= -k1,1)
  MOUNTS+=(-v "$conf:/etc/pip.conf:ro")
}

# What the install step reads, as a digest: buildah's --layers cache keys a RUN step on its text and arguments, not on
# the content of the checkout it mounts, so the digest is passed as an argument the step names.
source_digest() {
  { git ls-files -s; git diff HEAD; git ls-files -o --exclude-standard -z | xargs -0 -r sha256sum; } 2>/dev/null \
    | sha256sum | cut -c1-16
}

build() {
  local gpu=0 tag args=()
  [[ "${1:-}" == "--gpu" ]] && gpu=1
  mkdir -p "$WORK"
  local base; base=$(base_image)
  if [[ $gpu == 1 ]]; then
    tag=${IMAGE:-localhost/embedding-service:$VERSION-cuda}; args+=(--build-arg "TORCH_INDEX_URL=$CUDA_INDEX")
  else
    tag=${IMAGE:-localhost/embedding-service:$VERSION-cpu}
    if ! timeout 20 python3 -c "import urllib.request as u; u.urlopen('$CPU_INDEX/', timeout=15)" 2>/dev/null; then
      # These development machines reach no index but PyPI's: their pip has torch's CPU build on disk.
      say "$CPU_INDEX does not answer: torch's CPU build from this machine's pip instead (TORCH_INDEX_URL empty)"
      args+=(--build-arg "TORCH_INDEX_URL=")
    fi
  fi
  pip_mounts "$gpu"
  say "building $tag from $DOCKERFILE"
  local start=$SECONDS
  buildah bud --isolation chroot --layers -f "$DOCKERFILE" --build-arg "BASE_IMAGE=$base" \
    --build-arg "SOURCE_DIGEST=$(source_digest)" "${args[@]}" \
    "${MOUNTS[@]}" -t "$tag" . >&2
  say "built $tag in $((SECONDS - start)) s on $base"
  buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$tag" >&2
  echo "$tag"
}

need_tools
case "${1:-}" in
  build) shift; build "$@" ;;
  check) shift; exec python3 scripts/image_check.py --image "${IMAGE:-localhost/embedding-service:$VERSION-cpu}" \
           ${1:+--report "$1"} ;;
  standin) mkdir -p "$WORK"; standin ;;
  *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
