#!/bin/sh
# Regenerate docs/CONFORMANCE.md: `pyvdpa check` against DPDK's net_vhost
# (testpmd, io forwarding on a looped port, so frames come back; with
# iommu-support=1, so that it offers ACCESS_PLATFORM and the IOTLB case
# applies), the vhost-user-blk export of qemu-storage-daemon (a scratch
# 16 MiB image) and pyvdpa run's own sim-net (loopback) and sim-blk, one
# after the other; each run is saved with --json and the pages are rendered
# side by side with `pyvdpa check --report`.  Needs what scripts/setup.sh installs.  Under a
# minute on a 2-core machine.
# Run it as `flock /tmp/pyvdpa-heavy.lock scripts/conformance.sh` on a shared machine.
set -eu
cd "$(dirname "$0")/.."
out=${1:-docs/CONFORMANCE.md}
work=$(mktemp -d /tmp/pyvdpa-conformance.XXXXXX)
peer=
stop_peer() {
    if [ -n "$peer" ]; then
        kill "$peer" 2>/dev/null || true
        wait "$peer" 2>/dev/null || true
        peer=
    fi
}
trap 'stop_peer; rm -rf "$work"' EXIT INT TERM

wait_socket() {
    i=0
    while [ ! -S "$1" ]; do
        i=$((i + 1))
        if [ "$i" -gt 300 ]; then
            echo "conformance: $1 never appeared" >&2
            exit 1
        fi
        sleep 0.1
    done
}

check() {
    # check NAME SOCKET [OPTIONS]: one back-end's results into $work/NAME.json
    name=$1
    sock=$2
    shift 2
    echo "conformance: $name" >&2
    python3 -m pyvdpa check --socket "$sock" --json "$@" >"$work/$name.json" || true
}

dpdk=$(dpkg-query -W -f '${Version}' dpdk-dev | cut -d- -f1)
qsd=$(qemu-storage-daemon --version | sed -n 's/^qemu-storage-daemon version \([0-9.]*\).*/\1/p')

# testpmd waits for "enter" on its standard input: give it a pipe held open.
mkfifo "$work/testpmd.in"
dpdk-testpmd -l 0,1 --main-lcore 0 --no-pci \
    --no-huge -m 1024 --file-prefix="pyvdpa-conformance-$$" \
    --vdev "net_vhost0,iface=$work/vh.sock,queues=1,iommu-support=1" -- \
    --forward-mode=io --port-topology=loop --nb-cores=1 --no-mlockall --auto-start \
    <"$work/testpmd.in" >"$work/testpmd.log" 2>&1 &
peer=$!
exec 3>"$work/testpmd.in"
wait_socket "$work/vh.sock"
check "dpdk-$dpdk-net_vhost" "$work/vh.sock"
stop_peer
exec 3>&-

truncate -s 16M "$work/disk.img"
qemu-storage-daemon --blockdev "driver=file,node-name=disk,filename=$work/disk.img" \
    --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$work/qsd.sock,writable=on" \
    >"$work/qsd.log" 2>&1 &
peer=$!
wait_socket "$work/qsd.sock"
check "qemu-storage-daemon-$qsd-vhost-user-blk" "$work/qsd.sock"
stop_peer

python3 -m pyvdpa run --vdev sim-net,name=net0,mode=loopback --vdev sim-blk,name=blk0,size=16M \
    --iface "$work/pv" >"$work/pyvdpa.log" 2>&1 &
peer=$!
wait_socket "$work/pv0"
wait_socket "$work/pv1"
check pyvdpa-sim-net "$work/pv0" --type net
check pyvdpa-sim-blk "$work/pv1" --type blk
stop_peer

python3 -m pyvdpa check --generated-by scripts/conformance.sh --output "$out" --report \
    "$work/dpdk-$dpdk-net_vhost.json" "$work/qemu-storage-daemon-$qsd-vhost-user-blk.json" \
    "$work/pyvdpa-sim-net.json" "$work/pyvdpa-sim-blk.json"
echo "conformance: wrote $out" >&2
