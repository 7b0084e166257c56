"""The VMM side of Linux's vhost-vdpa character device (``/dev/vhost-vdpa-N``).

:mod:`~pyvdpa.vhost_vdpa.uapi` is the sans-I/O codec of the kernel's
interface (ioctl numbers, argument structs, IOTLB messages);
:mod:`~pyvdpa.vhost_vdpa.device` opens the device and performs the calls.
"""
