"""The virtio layer: spec constants, device layouts and virtqueues."""
