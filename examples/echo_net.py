"""An echo NIC: a virtio-net device that answers every frame with the frame itself.

Each frame the driver transmits comes back on its receive queue with the
source and destination MAC addresses swapped, as if a host on the wire
echoed it: one queue pair, ``VERSION_1``, and a config space holding the
device's MAC, written against the names :mod:`pyvdpa` exports only.

Run it, connect a vhost-user front-end (QEMU, DPDK virtio-user, which takes
the MAC from its ``mac`` devarg) and forward; Ctrl-C stops it::

    python3 examples/echo_net.py /tmp/echo.sock
    dpdk-testpmd --no-pci --no-huge -m 1024 \\
        --vdev net_virtio_user0,path=/tmp/echo.sock,mac=52:54:00:0e:c4:01 -- -i --forward-mode=io
    testpmd> start tx_first
"""

import argparse
import struct
from collections import deque

import pyvdpa

MAC = bytes.fromhex("5254000ec401")
RX, TX = 0, 1
HEADER = struct.pack("<10xH", 1)  # virtio_net_hdr (virtio 1.2, 5.1.6): num_buffers = 1
BACKLOG = 256  # frames waiting for receive buffers; more are dropped


class EchoNet(pyvdpa.ThreadedDevice):
    """Queue 1 (transmit) fills the backlog, queue 0 (receive) drains it."""

    device_id = pyvdpa.DeviceId.NET
    features = pyvdpa.VirtioFeature.VERSION_1 | pyvdpa.NetFeature.MAC
    protocol_features = pyvdpa.ProtocolFeature.CONFIG | pyvdpa.ProtocolFeature.REPLY_ACK
    num_queues = 2

    def __init__(self, mac: bytes = MAC) -> None:
        super().__init__()
        self.mac = mac
        self.frames: deque[bytes] = deque()
        # Each counter has one writer: the transmit or the receive worker.
        self.received = self.dropped = self.echoed = 0

    def get_config(self, offset: int, size: int) -> bytes:
        """The virtio-net config space: ``mac``; the fields after it read as zero."""
        return self.mac[offset : offset + size].ljust(size, b"\0")

    def process(self, ring: pyvdpa.Virtqueue) -> None:
        """Serve ``ring``; called on the ring's own worker thread after each kick."""
        if ring.index == RX:
            self.deliver(ring)
        elif self.take(ring):
            # Only a ring's own worker may touch it: wake the receive one.
            self.kick(RX)

    def take(self, tx: pyvdpa.Virtqueue) -> int:
        """Queue the transmitted frames, swapped, for the receive ring."""
        done = 0
        while (chain := tx.pop()) is not None:
            frame = chain.read_all()[len(HEADER) :]
            tx.push(chain, 0)
            done += 1
            if len(frame) < 14 or len(self.frames) >= BACKLOG:
                self.dropped += 1
            else:
                self.frames.append(frame[6:12] + frame[0:6] + frame[12:])
        self.received += done
        if done:
            tx.notify()
        return done

    def deliver(self, rx: pyvdpa.Virtqueue) -> None:
        """Write waiting frames into the driver's receive buffers."""
        done = 0
        while self.frames and (chain := rx.pop()) is not None:
            rx.push(chain, chain.write(HEADER + self.frames.popleft()))
            done += 1
        self.echoed += done
        if done:
            rx.notify()

    def reset(self) -> None:
        """The front-end left: forget what it did not receive."""
        self.frames.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket", help="vhost-user socket path to listen on")
    path = parser.parse_args().socket
    device = EchoNet()
    ready = f"echo NIC {device.mac.hex(':')} on {path}"
    pyvdpa.serve(device, path, ready=lambda: print(ready, flush=True))
    print(f"received {device.received} dropped {device.dropped} echoed {device.echoed}")


if __name__ == "__main__":
    main()
