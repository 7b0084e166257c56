#!/usr/bin/env bash
# Prepare the VDUSE test guest: Debian trixie's generic 6.12 kernel, its vDPA
# modules, and a busybox initramfs that runs a script on the host's own root
# file system (see scripts/vduse-guest/init).
#
# usage: scripts/vduse-guest/prepare.sh [--check] [DEST]
#
# --check only tells, by its exit status, whether DEST is complete and was
# built from the current scripts/vduse-guest files.
#
# DEST (default: vduse-guest/ in the project cache, $PYVDPA_CACHE, else
# $XDG_CACHE_HOME/pyvdpa, else ~/.cache/pyvdpa) receives:
#   vmlinuz          the kernel
#   initrd.gz        busybox, /init and the 9p modules; the vDPA modules, which
#                    /init copies to /run/vduse-guest/modules in the guest
#   modules/         the same modules, decompressed, and their load order:
#                    9p.order, vdpa.order (vduse, virtio_vdpa, virtio_blk,
#                    virtio_net, tun, ext4, ...), vhost_vdpa.order (vhost_vdpa and what
#                    it needs beyond vdpa.order)
#   kernel-package   the Debian package the kernel came from
#   recipe           SHA-256 of init, modules.py and prepare.sh, written last;
#                    tests/peers/vduse_guest.py checks it too
#
# Debian 12's kernel has no VDUSE; trixie's generic flavour has vduse,
# virtio_vdpa and vhost_vdpa as modules, and 9p to share the host's root
# (its cloud flavour has no 9p). The package is fetched with apt from
# trixie's archive, which is added with every package pinned at priority 50:
# apt never installs or upgrades anything from it unless asked by name.
#
# Idempotent: a complete, current DEST is left alone; otherwise it is built
# again from scratch. Needs root (or sudo) for apt.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
check_only=0
if [[ ${1:-} == --check ]]; then
    check_only=1
    shift
fi
cache_dir=${PYVDPA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvdpa}
dest=${1:-$cache_dir/vduse-guest}
python=${PYTHON:-python3}
busybox=/bin/busybox

sources=/etc/apt/sources.list.d/pyvdpa-trixie.sources
preferences=/etc/apt/preferences.d/pyvdpa-trixie
module_groups=(
    9p=9p,9pnet_virtio
    vdpa=vhost_iotlb,vdpa,vduse,virtio_vdpa,virtio_blk,failover,net_failover,virtio_net,tun,crc32c_generic,ext4
    vhost_vdpa=vhost,irqbypass,vhost_vdpa
)

fail() {
    echo "vduse-guest: $*" >&2
    exit 1
}

sudo_cmd=()
if [[ $EUID -ne 0 ]]; then
    sudo_cmd=(sudo)
fi

recipe() {
    cat "$here/init" "$here/modules.py" "$here/prepare.sh" | sha256sum | cut -d' ' -f1
}

complete() {
    local file
    for file in kernel-package vmlinuz initrd.gz modules/9p.order modules/vdpa.order \
        modules/vhost_vdpa.order recipe; do
        [[ -f $dest/$file ]] || return 1
    done
    [[ $(cat "$dest/recipe") == "$(recipe)" ]]
}

if complete; then
    exit 0
elif [[ $check_only -eq 1 ]]; then
    exit 1
fi
[[ -x $busybox ]] || fail "$busybox missing: install busybox-static"
if ldd "$busybox" >/dev/null 2>&1; then
    fail "$busybox is dynamically linked: install busybox-static"
fi
command -v cpio >/dev/null || fail "cpio missing: install cpio"

# trixie's archive, pinned low. Written only when it differs, so that a
# re-run leaves the files (and their timestamps) alone.
write_root_file() {
    local path=$1 content=$2
    if [[ ! -f $path || $(cat "$path") != "$content" ]]; then
        printf '%s\n' "$content" | "${sudo_cmd[@]}" tee "$path" >/dev/null
    fi
}
write_root_file "$sources" "Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
write_root_file "$preferences" "# pyvdpa's VDUSE test guest takes only its kernel from trixie, by name.
Package: *
Pin: release n=trixie
Pin-Priority: 50"

if [[ $(apt-cache madison linux-image-amd64) != *" trixie/main "* ]]; then
    # Refresh only trixie's index, keeping the other lists as they are.
    "${sudo_cmd[@]}" apt-get update -qq \
        -o Dir::Etc::SourceList="$sources" -o Dir::Etc::SourceParts=- \
        -o APT::Get::List-Cleanup=0
fi
kernel_pkg=$(apt-cache depends linux-image-amd64/trixie |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-/ && !seen++ { print $2 }')
[[ $kernel_pkg == linux-image-6.12.*-amd64 ]] ||
    fail "trixie's linux-image-amd64 names '$kernel_pkg', not a generic 6.12 kernel"

mkdir -p "$(dirname "$dest")"
work=$(mktemp -d "$(dirname "$dest")/vduse-guest.tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$kernel_pkg")
dpkg -x "$work/$kernel_pkg"_*.deb "$work/root"
rm -f "$work/$kernel_pkg"_*.deb

trees=("$work"/root/usr/lib/modules/* "$work"/root/lib/modules/*)
tree=
for candidate in "${trees[@]}"; do
    [[ -d $candidate/kernel ]] && tree=$candidate && break
done
[[ -n $tree ]] || fail "$kernel_pkg holds no module tree"
version=$(basename "$tree")
[[ -f $work/root/boot/vmlinuz-$version ]] || fail "$kernel_pkg holds no vmlinuz-$version"

staged=$work/guest
mkdir -p "$staged"
cp "$work/root/boot/vmlinuz-$version" "$staged/vmlinuz"
"$python" "$here/modules.py" "$tree" "$staged/modules" "${module_groups[@]}" >/dev/null

initramfs=$work/initramfs
mkdir -p "$initramfs"/{bin,dev,proc,sys,newroot,lib/modules,lib/vduse-guest/modules}
cp "$busybox" "$initramfs/bin/busybox"
cp "$here/init" "$initramfs/init"
chmod 755 "$initramfs/init"
cp "$staged/modules/9p.order" "$initramfs/lib/modules/"
for module in $(cat "$staged/modules/9p.order"); do
    cp "$staged/modules/$module.ko" "$initramfs/lib/modules/"
done
for group in vdpa vhost_vdpa; do
    cp "$staged/modules/$group.order" "$initramfs/lib/vduse-guest/modules/"
    for module in $(cat "$staged/modules/$group.order"); do
        cp "$staged/modules/$module.ko" "$initramfs/lib/vduse-guest/modules/"
    done
done
(cd "$initramfs" && find . | LC_ALL=C sort | cpio --create --format=newc --owner=0:0 --quiet) |
    gzip -1 >"$staged/initrd.gz"

echo "$kernel_pkg" >"$staged/kernel-package"
recipe >"$staged/recipe"
rm -rf "$dest"
mv "$staged" "$dest"
