"""``pyvdpa trace``: a vhost-user proxy that prints every message it relays.

:mod:`~pyvdpa.trace.render` names a payload's fields and prints records,
:mod:`~pyvdpa.trace.conversation` decodes one connection pair's messages
and pairs replies with requests (both sans I/O), :mod:`~pyvdpa.trace.proxy`
relays the sockets and their fds, and :mod:`~pyvdpa.trace.command` is the
command line.
"""

from pyvdpa.trace.conversation import Conversation
from pyvdpa.trace.proxy import Endpoint, Record, SinkError, TraceProxy
from pyvdpa.trace.render import (
    ChannelKind,
    ConnectionRecord,
    MessageRecord,
    Side,
    format_json,
    format_text,
)

__all__ = [
    "ChannelKind",
    "ConnectionRecord",
    "Conversation",
    "Endpoint",
    "MessageRecord",
    "Record",
    "Side",
    "SinkError",
    "TraceProxy",
    "format_json",
    "format_text",
]
