"""Managing a running ``pyvdpa run``: management devices, a control socket, a client.

Theory of operation (iproute2 ``vdpa``, VFIO mdev, SPDK's JSON-RPC socket):
:mod:`~pyvdpa.manage.operations` holds the one implementation of every
management operation (``dev add``/``del``/``show``, ``config show``,
``vstats show``, ``stats``) over the device table; :mod:`.mgmtdev`
publishes the management devices and their types and validates ``dev add``;
:mod:`.rpc` is the sans-I/O JSON-RPC 2.0 codec; :mod:`.methods` binds
method names to operations; :mod:`.server` serves them on a Unix socket;
:mod:`.commands` parses iproute2-shaped command lines and prints results in
iproute2's layout; :mod:`.client` is ``pyvdpa mgmtdev|dev|stats``;
:mod:`.metrics` renders and serves OpenMetrics text.
"""
