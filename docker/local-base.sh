#!/usr/bin/env bash
# Build a Debian bookworm base image locally, for machines that reach Debian's and PyPI's mirrors but no container
# registry. The Dockerfile's BASE_IMAGE build argument takes it in place of the published debian:bookworm slim image:
#
#     bash docker/local-base.sh                       # -> localhost/aegis-local-base:bookworm (kept if it exists)
#     podman build --build-arg BASE_IMAGE=localhost/aegis-local-base:bookworm ...
#
# What this machine needs to reach its package mirrors goes into this image only, never into the Dockerfile:
#   * the CA certificates in /usr/local/share/ca-certificates (a TLS-intercepting proxy's CA, say), added to the
#     image's system store, with the environment that makes Python's HTTP clients use that store;
#   * an http(s) package index that pip is set up to use here (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, or index-url /
#     extra-index-url in pip's configuration), written to the image's /etc/pip.conf. file:// indexes and find-links
#     are left out: a build cannot see this machine's disk (local wheels go in through docker/wheels/ instead).
#
# Options: --force (rebuild even if the image exists), --image NAME, --mirror URL (default: this machine's apt mirror,
# else http://deb.debian.org/debian). Needs root, debootstrap and podman.
set -euo pipefail

image=localhost/aegis-local-base:bookworm
force=0
mirror=""
while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        --image) image="$2"; shift ;;
        --mirror) mirror="$2"; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "local-base.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$force" = 0 ] && podman image exists "$image"; then
    echo "local base: $image exists (--force rebuilds it)"
    exit 0
fi

if [ -z "$mirror" ]; then
    # the first Debian URI that apt on this machine uses (deb822 or one-line format)
    mirror=$(sed -n -E 's#^URIs:[[:space:]]*(\S+/debian)/?$#\1#p; s#^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?(\S+/debian)/?[[:space:]].*#\2#p' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n 1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
fi
security=${mirror%/debian}/debian-security

start=$(date +%s)
root=$(mktemp -d /var/tmp/aegis-base.XXXXXX)
trap 'rm -rf "$root"' EXIT

echo "local base: debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF

# this machine's extra CAs, into the image's system store
shopt -s nullglob
certs=(/usr/local/share/ca-certificates/*.crt)
if [ ${#certs[@]} -gt 0 ]; then
    cp "${certs[@]}" "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
    echo "local base: added ${#certs[@]} CA certificate(s) from /usr/local/share/ca-certificates"
fi

# pip: the system store, and any http(s) index this machine's pip uses
index=""
extra=""
if command -v pip >/dev/null 2>&1; then
    index=$(pip config get global.index-url 2>/dev/null || true)
    extra=$(pip config get global.extra-index-url 2>/dev/null || true)
fi
index=${PIP_INDEX_URL:-$index}
extra="${PIP_EXTRA_INDEX_URL:-} $extra"
{
    echo "[global]"
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    echo "timeout = 180"
    case "$index" in http://*|https://*) echo "index-url = $index" ;; esac
    urls=$(for u in $extra; do case "$u" in http://*|https://*) echo "$u" ;; esac; done | sort -u | tr '\n' ' ')
    [ -n "${urls// /}" ] && echo "extra-index-url = $urls"
} >"$root/etc/pip.conf"

# a small image: no package lists, caches or docs
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/tmp/* "$root"/var/tmp/*
# apt in a container: no recommends, no docs (as Docker's Debian images)
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$root/etc/apt/apt.conf.d/90aegis-local-base"

ca=/etc/ssl/certs/ca-certificates.crt
tar -C "$root" --numeric-owner -c . | podman import \
    --change "ENV SSL_CERT_FILE=$ca" --change "ENV REQUESTS_CA_BUNDLE=$ca" --change "ENV CURL_CA_BUNDLE=$ca" \
    --change "ENV PIP_CERT=$ca" --change 'CMD ["bash"]' \
    --message "aegis local base: debootstrap minbase bookworm" - "$image" >/dev/null
echo "local base: $image built in $(( $(date +%s) - start )) s ($(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
