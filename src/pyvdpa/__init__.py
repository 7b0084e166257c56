"""pyvdpa: vDPA (vhost data path acceleration) and vhost-user in Python.

The package is layered (see ``docs/ARCHITECTURE.md``): :mod:`pyvdpa.virtio`
(spec constants, layouts, split and packed rings), :mod:`pyvdpa.memory`
(guest memory and the dirty log), :mod:`pyvdpa.vhost_user` (codec,
transport, back-end, front-end), :mod:`pyvdpa.devices` (simulated devices)
and :mod:`pyvdpa.drive` (traffic drivers behind ``pyvdpa drive``).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
