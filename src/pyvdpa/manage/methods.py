"""The control socket's methods: JSON-RPC names bound to the manager's operations.

Theory of operation: :data:`METHODS` lists every method with the
parameters it takes (name, JSON type, required); :func:`call` checks a
request's parameters against that list before running the operation, and
turns what the operation raises into an error object:

======  ==========================================================
code    meaning
======  ==========================================================
-32601  unknown method
-32602  invalid params (unknown, missing or mistyped; a bad value)
-32000  the operation failed (the message says why)
-32001  no such device
-32002  a device of that name or UUID exists
-32003  no available instances (the device table is full)
-32603  internal error (a bug: logged, the server goes on)
======  ==========================================================

docs/CONTROL.md documents each method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pyvdpa.errors import ConfigError, PyvdpaError
from pyvdpa.manage.operations import (
    DeviceExistsError,
    Manager,
    NoInstancesError,
    NoSuchDeviceError,
)
from pyvdpa.manage.rpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    Request,
    RpcError,
)

__all__ = [
    "DEVICE_EXISTS",
    "METHODS",
    "NO_INSTANCES",
    "NO_SUCH_DEVICE",
    "OPERATION_FAILED",
    "Method",
    "call",
]

log = logging.getLogger(__name__)

OPERATION_FAILED: Final = -32000
NO_SUCH_DEVICE: Final = -32001
DEVICE_EXISTS: Final = -32002
NO_INSTANCES: Final = -32003

_ERROR_CODES: Final[tuple[tuple[type[Exception], int], ...]] = (
    (ConfigError, INVALID_PARAMS),
    (NoSuchDeviceError, NO_SUCH_DEVICE),
    (DeviceExistsError, DEVICE_EXISTS),
    (NoInstancesError, NO_INSTANCES),
    (PyvdpaError, OPERATION_FAILED),
    (OSError, OPERATION_FAILED),
)

#: Largest queue index a request may name (virtio's limit on queues).
MAX_QIDX: Final = 0xFFFF


@dataclass(frozen=True, slots=True)
class Method:
    """A method: its parameters (name -> (JSON type, required)) and its operation.

    ``params`` ``None``: the operation validates its parameters itself.
    """

    params: dict[str, tuple[type, bool]] | None
    run: Callable[[Manager, dict[str, object]], object]


def _str(params: dict[str, object], name: str) -> str:
    value = params[name]
    assert isinstance(value, str)
    return value


def _opt_str(params: dict[str, object], name: str) -> str | None:
    return _str(params, name) if name in params else None


def _vstats(manager: Manager, params: dict[str, object]) -> object:
    qidx = params["qidx"]
    assert isinstance(qidx, int)
    if not 0 <= qidx <= MAX_QIDX:
        raise ConfigError(f"qidx must be 0..{MAX_QIDX}, not {qidx}")
    return manager.vstats_show(_str(params, "name"), qidx)


def _delete(manager: Manager, params: dict[str, object]) -> object:
    manager.delete(_str(params, "name"))
    return {}


#: Every method of the control socket.
METHODS: Final[dict[str, Method]] = {
    "mgmtdev_show": Method(
        {"name": (str, False)}, lambda m, p: m.mgmtdev_show(_opt_str(p, "name"))
    ),
    "dev_add": Method(None, lambda m, p: m.add(p)),
    "dev_del": Method({"name": (str, True)}, _delete),
    "dev_show": Method({"name": (str, False)}, lambda m, p: m.dev_show(_opt_str(p, "name"))),
    "dev_config_show": Method(
        {"name": (str, False)}, lambda m, p: m.config_show(_opt_str(p, "name"))
    ),
    "dev_vstats_show": Method({"name": (str, True), "qidx": (int, True)}, _vstats),
    "stats": Method({}, lambda m, p: m.stats()),
}


def _check_params(
    method: str, schema: dict[str, tuple[type, bool]], params: dict[str, object]
) -> None:
    unknown = sorted(set(params) - set(schema))
    if unknown:
        raise RpcError(INVALID_PARAMS, f"{method} takes no parameter {', '.join(unknown)}")
    for name, (kind, required) in schema.items():
        if name not in params:
            if required:
                raise RpcError(INVALID_PARAMS, f"{method} needs parameter {name}")
            continue
        value = params[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise RpcError(INVALID_PARAMS, f"{method}: {name} must be of type {kind.__name__}")


def call(manager: Manager, request: Request) -> object:
    """Run ``request`` on ``manager``; its result, or :class:`RpcError` with the error object."""
    method = METHODS.get(request.method)
    try:
        if method is None:
            raise RpcError(METHOD_NOT_FOUND, f"no method {request.method!r}")
        if method.params is not None:
            _check_params(request.method, method.params, request.params)
        return method.run(manager, request.params)
    except RpcError as exc:
        exc.request_id = request.id
        raise
    except Exception as exc:
        for kind, code in _ERROR_CODES:
            if isinstance(exc, kind):
                raise RpcError(code, str(exc), request_id=request.id) from exc
        log.exception("control: %s failed", request.method)
        raise RpcError(
            INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}", request_id=request.id
        ) from exc
