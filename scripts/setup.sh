#!/usr/bin/env bash
# Prepare a Debian 12 machine for pyvdpa's development and tests.
#
# Installs the third-party peers the tests drive (DPDK testpmd, QEMU,
# qemu-storage-daemon, busybox for the guest initramfs, iproute2 for network
# namespaces), installs the project with its test extras, and caches the guest
# kernel and virtio modules used by the QEMU guest tests, and the VDUSE guest
# (Debian trixie's kernel, with the vDPA bus, and its initramfs; see
# scripts/vduse-guest/prepare.sh); compiles the data-path kernels once, so
# that no later start waits for the compiler.
#
# Idempotent: a re-run installs nothing that is already there and reuses the
# cached guest kernel. The cache lives in $PYVDPA_CACHE, else
# $XDG_CACHE_HOME/pyvdpa, else ~/.cache/pyvdpa.
set -euo pipefail

trap 'echo "setup: FAILED (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_dir=${PYVDPA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvdpa}
guest_dir=$cache_dir/guest
vduse_guest_dir=$cache_dir/vduse-guest
python=${PYTHON:-python3}

packages=(dpdk-dev qemu-system-x86 qemu-system-common busybox-static cpio iproute2)
# The guest's virtio modules, in load order; tests/peers/guest.py (GUEST_MODULES) loads
# the same list.
guest_modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    failover net_failover virtio_net virtio_blk)

sudo_cmd=()
if [[ $EUID -ne 0 ]]; then
    sudo_cmd=(sudo)
fi

apt_updated=0
apt_update_once() {
    if [[ $apt_updated -eq 0 ]]; then
        "${sudo_cmd[@]}" apt-get update
        apt_updated=1
    fi
}

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg -s "$pkg" >/dev/null 2>&1; then
        missing+=("$pkg")
    fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt_update_once
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
else
    echo "setup: Debian packages already installed"
fi

echo "setup: installing pyvdpa with its test extras"
"$python" -m pip install --quiet --root-user-action=ignore -e "$repo_root[test]"

guest_complete() {
    [[ -f $guest_dir/kernel-package && -f $guest_dir/vmlinuz ]] || return 1
    local module
    for module in "${guest_modules[@]}"; do
        [[ -f $guest_dir/modules/$module.ko ]] || return 1
    done
}

if guest_complete; then
    echo "setup: guest kernel already cached ($(cat "$guest_dir/kernel-package")) in $guest_dir"
else
    echo "setup: fetching guest kernel…"
    apt_update_once
    kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ && !seen++ { print $2 }')
    if [[ -z $kernel_pkg ]]; then
        echo "setup: apt-cache names no kernel for linux-image-cloud-amd64" >&2
        exit 1
    fi
    mkdir -p "$cache_dir"
    work=$(mktemp -d "$cache_dir/tmp.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download -o APT::Sandbox::User=root "$kernel_pkg")
    dpkg -x "$work"/"$kernel_pkg"_*.deb "$work/root"

    staged=$work/guest
    mkdir -p "$staged/modules"
    vmlinuz=("$work"/root/boot/vmlinuz-*)
    cp "${vmlinuz[0]}" "$staged/vmlinuz"
    for module in "${guest_modules[@]}"; do
        found=$(find "$work/root/lib/modules" -name "$module.ko" -print -quit)
        if [[ -z $found ]]; then
            echo "setup: $kernel_pkg has no module $module.ko" >&2
            exit 1
        fi
        cp "$found" "$staged/modules/"
    done
    echo "$kernel_pkg" >"$staged/kernel-package"
    rm -rf "$guest_dir"
    mv "$staged" "$guest_dir"
    echo "setup: guest kernel $kernel_pkg cached in $guest_dir"
fi

prepare_vduse_guest=("$repo_root/scripts/vduse-guest/prepare.sh")
if "${prepare_vduse_guest[@]}" --check "$vduse_guest_dir"; then
    echo "setup: VDUSE guest already cached ($(cat "$vduse_guest_dir/kernel-package")) in $vduse_guest_dir"
else
    echo "setup: preparing the VDUSE guest (trixie's kernel, apt pinned at priority 50)…"
    PYTHON=$python "${prepare_vduse_guest[@]}" "$vduse_guest_dir"
    echo "setup: VDUSE guest $(cat "$vduse_guest_dir/kernel-package") cached in $vduse_guest_dir"
fi

echo "setup: loading the data-path kernels (compiled and cached on disk the first time)…"
"$python" -c 'from pyvdpa.dataplane.engine import warm_up; warm_up(lambda line: print("setup:", line, flush=True))'

echo "setup: done"
