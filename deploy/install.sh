#!/bin/sh
# Install middleman as a systemd service: the binary, the unit, the system user it runs
# as (a sysusers.d file), /etc/middleman with a configuration and key files.
#
#   deploy/install.sh [--tls] [--root DIR] [--binary FILE]
#
#   --tls          public wss:// on port 443: configuration deploy/middleman.public.toml
#                  (tls.crt and tls.key are yours to put in /etc/middleman). Without it:
#                  plain ws:// on loopback behind a proxy that terminates TLS
#                  (deploy/middleman.proxy.toml).
#   --root DIR     install under DIR instead of / (a package build, a test); the user
#                  is then not created, ownership not set and systemctl left alone (a
#                  package does these in its postinst: systemd-sysusers, then
#                  chown root:middleman on /etc/middleman and its files).
#   --binary FILE  the middleman binary (default: target/release/middleman, or under
#                  $CARGO_TARGET_DIR).
#
# Idempotent: running it again gives the same files. The binary, the unit and the
# sysusers.d file are replaced; the configuration and the key files are created only
# when absent, so edits and keys survive (to switch between --tls and not, replace
# /etc/middleman/middleman.toml yourself). Each missing key file gets one random key,
# which is not printed: read it from the file.
#
# The server reads /etc/middleman directly, so that a reload (systemctl reload
# middleman) sees the files as they are now: the folder and its files belong to root,
# group middleman, mode 0750 / 0640 (readable by the server, writable by root only).
# Files an earlier version installed for LoadCredential= (mode 0600, and the TLS drop-in
# middleman.service.d/tls.conf) are brought to that layout. It does not enable or start
# the service.
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

sysusers="$root/etc/sysusers.d"

install -d -m 0755 "$root/usr/local/bin" "$units" "$sysusers"
install -m 0755 "$binary" "$root/usr/local/bin/middleman"
install -m 0644 "$here/middleman.service" "$units/middleman.service"
install -m 0644 "$here/middleman.sysusers.conf" "$sysusers/middleman.conf"
# The drop-in of earlier versions handed the certificate over with LoadCredential=.
rm -f "$units/middleman.service.d/tls.conf"
rmdir "$units/middleman.service.d" 2>/dev/null || true
if [ "$tls" = yes ]; then
    config="$here/middleman.public.toml"
else
    config="$here/middleman.proxy.toml"
fi

if [ -z "$root" ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers "$sysusers/middleman.conf"
    else
        getent group middleman >/dev/null || groupadd --system middleman
        getent passwd middleman >/dev/null ||
            useradd --system --gid middleman --no-create-home --home-dir / \
                --shell /usr/sbin/nologin middleman
    fi
fi

install -d -m 0750 "$etc"
chmod 0750 "$etc"
if [ ! -e "$etc/middleman.toml" ]; then
    install -m 0640 "$config" "$etc/middleman.toml"
fi
for role in service client; do
    f="$etc/$role.keys"
    if [ ! -e "$f" ]; then
        key=$(LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32)
        (
            umask 027
            printf '# %s keys, one per line\n%s\n' "$role" "$key" >"$f"
        )
    fi
done
# Readable by the server's group, writable by root only (also for files an earlier
# version made root-only).
for f in middleman.toml service.keys client.keys tls.crt tls.key; do
    [ -e "$etc/$f" ] || continue
    chmod 0640 "$etc/$f"
    [ -n "$root" ] || chown root:middleman "$etc/$f"
done
[ -n "$root" ] || chown root:middleman "$etc"

if [ "$tls" = yes ]; then
    for f in tls.crt tls.key; do
        [ -e "$etc/$f" ] || echo "$0: put $f in $etc (owner root, group middleman, mode 0640) before starting middleman" >&2
    done
fi

if [ -z "$root" ]; then
    systemctl daemon-reload
    echo "installed; next:"
    echo "  middleman --config /etc/middleman/middleman.toml --check-config"
    echo "  systemctl enable --now middleman"
    echo "  (after changing a file there: systemctl reload middleman)"
fi
