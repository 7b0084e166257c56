"""VDUSE: virtio devices in user space on the kernel's vDPA bus.

:mod:`pyvdpa.vduse.uapi` holds the kernel's binary interface as bytes and
dataclasses (no I/O), :mod:`pyvdpa.vduse.kernel` the system calls on
``/dev/vduse``, and :mod:`pyvdpa.vduse.netlink` the generic-netlink client
that puts a device on the vDPA bus and takes it off.
"""
