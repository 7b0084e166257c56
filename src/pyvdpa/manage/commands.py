"""iproute2 ``vdpa`` words in, iproute2 ``vdpa`` output out, sans I/O.

Theory of operation (iproute2 ``vdpa/vdpa.c``: objects and commands
matched by prefix, ``dev add name NAME mgmtdev MGMTDEV [KEY VALUE]...``,
one section per command in JSON, ``NAME: key value ...`` lines in text):
:func:`parse_words` turns a command line into the JSON-RPC method and
parameters the control socket takes; :func:`render` turns the method's
result into text or JSON.  Both the ``pyvdpa mgmtdev|dev|stats`` client and
the ``vdpa>`` console use them, so they print the same thing.

A ``dev add`` value is converted by the kind its management device gives
the key (integers, booleans given as a bare word, sizes, paths made
absolute against the caller's directory); the server checks it again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pyvdpa.errors import ConfigError
from pyvdpa.manage.mgmtdev import MGMTDEVS

__all__ = ["FLAGS", "USAGE", "Command", "parse_words", "render", "split_flags"]

USAGE = """Usage: pyvdpa [ --control PATH ] [ -j ] [ -p ] OBJECT COMMAND
  pyvdpa mgmtdev show [ MGMTDEV ]
  pyvdpa dev show [ DEV ]
  pyvdpa dev add name NAME mgmtdev MGMTDEV [ uuid UUID ] [ socket PATH ] [ client ]
                 [ bus vhost-user|vduse ] [ KEY VALUE ]...
      sim-net: mac MAC, mtu N, max_vqp N, mode loopback|drop|gen|tap, ifname TAP, frame_size N
      sim-blk: path FILE | size N, readonly, queues N, serial S
  pyvdpa dev del DEV
  pyvdpa dev config show [ DEV ]
  pyvdpa dev vstats show DEV qidx N
  pyvdpa stats"""

#: iproute2's output flags, alone or together: JSON (``j``), pretty (``p``).
FLAGS = ("-j", "--json", "-p", "--pretty", "-jp", "-pj")

_BOOLEANS = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


@dataclass(frozen=True, slots=True)
class Command:
    """A command line as a control socket request; ``section`` names its JSON output."""

    method: str
    params: dict[str, object]
    section: str | None


def split_flags(words: Sequence[str]) -> tuple[list[str], bool, bool]:
    """``words`` without the output flags, and whether JSON and pretty were asked."""
    flags = [word for word in words if word in FLAGS]
    json_output = any("j" in flag for flag in flags)
    pretty = any("p" in flag for flag in flags)
    return [word for word in words if word not in FLAGS], json_output, pretty


def _matches(word: str, command: str) -> bool:
    """iproute2's ``matches``: ``word`` is a non-empty prefix of ``command``."""
    return bool(word) and command.startswith(word)


def _one_optional_name(words: Sequence[str], usage: str) -> dict[str, object]:
    if len(words) > 1:
        raise ConfigError(f"too many arguments; usage: {usage}")
    return {"name": words[0]} if words else {}


def _integer(key: str, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a number") from None


def _dev_add(words: Sequence[str], cwd: str) -> dict[str, object]:
    mgmtdev = None
    for index, word in enumerate(words[:-1]):
        if word == "mgmtdev":
            mgmtdev = MGMTDEVS.get(words[index + 1])
    params: dict[str, object] = {}
    pending = list(words)
    while pending:
        key = pending.pop(0)
        if key in params:
            raise ConfigError(f"dev add: {key} given twice")
        spec = mgmtdev.key(key) if mgmtdev is not None else None
        if spec is not None and spec.kind == "boolean":
            # A bare word, as iproute2's flags, or followed by on/off.
            params[key] = (
                _BOOLEANS[pending.pop(0).lower()]
                if pending and pending[0].lower() in _BOOLEANS
                else True
            )
            continue
        if not pending:
            raise ConfigError(f"dev add: {key} needs a value")
        value = pending.pop(0)
        if spec is None:
            params[key] = value
        elif spec.kind == "integer" or (spec.kind == "size" and value.isdigit()):
            params[key] = _integer(key, value)
        elif spec.kind == "path":
            params[key] = os.path.join(cwd, value)
        else:
            params[key] = value
    if "name" not in params or "mgmtdev" not in params:
        raise ConfigError("dev add needs name NAME and mgmtdev MGMTDEV")
    return params


def parse_words(words: Sequence[str], cwd: str | None = None) -> Command:
    """A ``mgmtdev``/``dev``/``stats`` command line as a :class:`Command`."""
    cwd = os.getcwd() if cwd is None else cwd
    if not words:
        raise ConfigError(USAGE)
    obj, rest = words[0], list(words[1:])
    if _matches(obj, "mgmtdev"):
        if rest and not (_matches(rest[0], "show") or _matches(rest[0], "list")):
            raise ConfigError(f'mgmtdev: command "{rest[0]}" not found (show)')
        params = _one_optional_name(rest[1:], "mgmtdev show [ MGMTDEV ]")
        return Command("mgmtdev_show", params, "mgmtdev")
    if _matches(obj, "stats"):
        if rest:
            raise ConfigError("stats takes no arguments")
        return Command("stats", {}, None)
    if not _matches(obj, "dev"):
        raise ConfigError(f'object "{obj}" not found (mgmtdev, dev, stats)')
    if not rest or _matches(rest[0], "show") or _matches(rest[0], "list"):
        return Command("dev_show", _one_optional_name(rest[1:], "dev show [ DEV ]"), "dev")
    verb, args = rest[0], rest[1:]
    if _matches(verb, "add"):
        return Command("dev_add", _dev_add(args, cwd), "dev")
    if _matches(verb, "del"):
        if len(args) != 1:
            raise ConfigError("usage: dev del DEV")
        return Command("dev_del", {"name": args[0]}, None)
    if _matches(verb, "config"):
        if args and not _matches(args[0], "show"):
            raise ConfigError(f'dev config: command "{args[0]}" not found (show)')
        params = _one_optional_name(args[1:], "dev config show [ DEV ]")
        return Command("dev_config_show", params, "config")
    if verb == "vstats":
        if len(args) != 4 or args[0] != "show" or args[2] != "qidx":
            raise ConfigError("usage: dev vstats show DEV qidx N")
        return Command(
            "dev_vstats_show", {"name": args[1], "qidx": _integer("qidx", args[3])}, "vstats"
        )
    raise ConfigError(f'dev: command "{verb}" not found (show, add, del, config, vstats)')


def _text_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _fields(entry: dict[str, object], skip: Sequence[str] = ()) -> str:
    return " ".join(
        f"{key} {_text_value(value)}"
        for key, value in entry.items()
        if key not in skip and not isinstance(value, (list, dict))
    )


def _text_mgmtdev(result: dict[str, dict[str, object]]) -> list[str]:
    lines = []
    for name, entry in result.items():
        classes = entry.get("supported_classes", [])
        features = entry.get("dev_features", [])
        assert isinstance(classes, list) and isinstance(features, list)
        lines.append(f"{name}: ")
        lines.append(f"  supported_classes {' '.join(map(str, classes))}")
        lines.append(
            f"  max_supported_vqs {entry.get('max_supported_vqs')} "
            f"dev_features {' '.join(map(str, features))}"
        )
        types = entry.get("supported_types", {})
        assert isinstance(types, dict)
        for type_entry in types.values():
            keys = type_entry.get("keys", {})
            lines.append(
                f"  supported_type {type_entry.get('name')} device_api "
                f"{type_entry.get('device_api')} available_instances "
                f"{type_entry.get('available_instances')}"
            )
            lines.append(f"  keys {' '.join(keys)}")
            devices = type_entry.get("devices")
            if devices:
                lines.append(f"  devices {' '.join(map(str, devices))}")
    return lines


def _text_config(result: dict[str, dict[str, object]]) -> list[str]:
    lines = []
    for name, entry in result.items():
        lines.append(f"{name}: {_fields(entry)}")
        features = entry.get("negotiated_features")
        if isinstance(features, list):
            lines.append(f"  negotiated_features {' '.join(map(str, features))}")
    return lines


def _text_stats(result: dict[str, object]) -> list[str]:
    lines = []
    devices = result.get("devices", {})
    assert isinstance(devices, dict)
    for name, device in devices.items():
        lines.append(f"{name}: mgmtdev {device['mgmtdev']} bus {device['bus']}")
        lines.extend(f"  {_fields(queue)}" for queue in device["queues"])
    return lines


def render(command: Command, result: object, *, json_output: bool, pretty: bool) -> str:
    """The output of ``command`` for ``result``, without a final newline ('' for none)."""
    if json_output:
        wrapped = result if command.section is None else {command.section: result}
        if command.method == "dev_del":
            return ""
        return json.dumps(wrapped, indent=4 if pretty else None)
    if command.method in ("dev_add", "dev_del"):
        return ""
    if not isinstance(result, dict):
        return _text_value(result)
    if command.method == "mgmtdev_show":
        lines = _text_mgmtdev(result)
    elif command.method == "dev_config_show":
        lines = _text_config(result)
    elif command.method == "stats":
        lines = _text_stats(result)
    else:
        lines = [f"{name}: {_fields(entry)}" for name, entry in result.items()]
    return "\n".join(lines)
