#!/bin/sh
# Install middleman as a systemd service: the binary, the unit (and, with --tls, its
# drop-in for the certificate), /etc/middleman with a configuration and key files.
#
#   deploy/install.sh [--tls] [--root DIR] [--binary FILE]
#
#   --tls          public wss:// on port 443: configuration deploy/middleman.public.toml,
#                  unit drop-in middleman.service.d/tls.conf (tls.crt and tls.key are
#                  yours to put in /etc/middleman). Without it: plain ws:// on loopback
#                  behind a proxy that terminates TLS (deploy/middleman.proxy.toml), and
#                  the drop-in is removed if an earlier run installed it.
#   --root DIR     install under DIR instead of / (a package build, a test); systemctl
#                  is then left alone.
#   --binary FILE  the middleman binary (default: target/release/middleman, or under
#                  $CARGO_TARGET_DIR).
#
# Idempotent: running it again gives the same files. The binary, the unit and the drop-in
# are replaced; the configuration and the key files are created only when absent, so
# edits and keys survive (to switch between --tls and not, replace
# /etc/middleman/middleman.toml yourself). Each missing key file gets one random key,
# which is not printed: read it from the file (root only).
#
# No user is created: the unit runs the server as a DynamicUser, and systemd hands the
# root-only files to it as credentials. It does not enable or start the service.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
root=
tls=no
binary="${CARGO_TARGET_DIR:-$repo/target}/release/middleman"

usage() {
    echo "usage: $0 [--tls] [--root DIR] [--binary FILE]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
    --tls) tls=yes ;;
    --root)
        [ $# -ge 2 ] || usage
        root=$2
        shift
        ;;
    --root=*) root=${1#--root=} ;;
    --binary)
        [ $# -ge 2 ] || usage
        binary=$2
        shift
        ;;
    --binary=*) binary=${1#--binary=} ;;
    -h | --help) usage ;;
    *)
        echo "$0: unknown argument $1" >&2
        usage
        ;;
    esac
    shift
done

if [ -n "$root" ]; then
    [ -d "$root" ] || {
        echo "$0: --root $root is not a folder" >&2
        exit 1
    }
    root=$(cd "$root" && pwd)
fi
[ -x "$binary" ] || {
    echo "$0: no middleman binary at $binary (cargo build --release, or --binary FILE)" >&2
    exit 1
}

etc="$root/etc/middleman"
units="$root/etc/systemd/system"

install -d -m 0755 "$root/usr/local/bin" "$units"
install -m 0755 "$binary" "$root/usr/local/bin/middleman"
install -m 0644 "$here/middleman.service" "$units/middleman.service"
if [ "$tls" = yes ]; then
    install -d -m 0755 "$units/middleman.service.d"
    install -m 0644 "$here/middleman.service.d/tls.conf" "$units/middleman.service.d/tls.conf"
    config="$here/middleman.public.toml"
else
    rm -f "$units/middleman.service.d/tls.conf"
    rmdir "$units/middleman.service.d" 2>/dev/null || true
    config="$here/middleman.proxy.toml"
fi

install -d -m 0700 "$etc"
if [ ! -e "$etc/middleman.toml" ]; then
    install -m 0600 "$config" "$etc/middleman.toml"
fi
for role in service client; do
    f="$etc/$role.keys"
    if [ ! -e "$f" ]; then
        key=$(LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32)
        (
            umask 077
            printf '# %s keys, one per line\n%s\n' "$role" "$key" >"$f"
        )
    fi
done

if [ "$tls" = yes ]; then
    for f in tls.crt tls.key; do
        [ -e "$etc/$f" ] || echo "$0: put $f in $etc (mode 0600) before starting middleman" >&2
    done
fi

if [ -z "$root" ]; then
    systemctl daemon-reload
    echo "installed; next:"
    echo "  middleman --config /etc/middleman/middleman.toml --check-config"
    echo "  systemctl enable --now middleman"
fi
