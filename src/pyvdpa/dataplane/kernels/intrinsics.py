"""What the kernels do below numba: guest-memory loads and stores, atomics, views, system calls.

Theory of operation
-------------------
The kernels never see Python objects, and guest memory is not a numpy array
they own: it is host addresses (int64) into the front-end's shared memory.
Each intrinsic here emits a few LLVM instructions in its caller:

* **Loads and stores** of 8, 16, 32 and 64 bits at a host address, plain or
  with the ordering virtio 1.2 section 2.7.13 asks for, for both ring
  layouts: the device loads ``avail.idx`` or a packed descriptor's
  flags with *acquire* before reading what they publish, and publishes
  ``used.idx`` or a used descriptor's flags with a *release* store after
  writing what they cover.  :data:`fence` is the sequentially consistent
  fence that separates publishing from reading the driver's event
  suppression, and re-enabling notifications from re-checking the ring.
* **Views**: a row or a table of rows at a host address (or inside an int64
  array Python holds) as numba records, so that the kernels read named
  fields (``q.last_avail``, ``segs[i].length``); no owner, no reference
  count, no copy.  :data:`load_relaxed` / :data:`store_relaxed` access a
  field another thread shares (atomically, never hoisted out of a loop).
* **Copies** without a call for the short ones, libc's ``memcpy`` for the
  long ones; **prefetches**; an atomic OR for the dirty log, which the
  front-end harvests concurrently.
* **System calls** straight into libc (``epoll_wait``, ``readv``,
  ``pwritev``, ``fallocate``, eventfd reads and writes, ``errno``,
  ``clock_gettime`` through the vDSO) and an indirect call through a C
  entry point, which the worker loop runs its units' programs with.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeAlias, cast

from llvmlite import ir  # type: ignore[import-untyped]
from numba import types
from numba.core import cgutils as _cgutils
from numba.core.typing.templates import Signature
from numba.extending import intrinsic

__all__ = [
    "EPOLL_DATA_OFFSET",
    "EPOLL_EVENT_SIZE",
    "Record",
    "Table",
    "atomic_or_u8",
    "call_entry",
    "copy1",
    "copy2",
    "copy4",
    "copy8",
    "copy16",
    "copy32",
    "copy64",
    "cpu_relax",
    "epoll_wait",
    "errno",
    "eventfd_drain",
    "eventfd_signal",
    "fallocate",
    "fdatasync",
    "fence",
    "ld_acq_u16",
    "ld_u8",
    "ld_u16",
    "ld_u32",
    "ld_u64",
    "load_relaxed",
    "memcpy",
    "monotonic_ns",
    "preadv",
    "prefetch",
    "prefetch_write",
    "pwrite",
    "pwritev",
    "readv",
    "record_at",
    "record_of",
    "records_at",
    "records_of",
    "signed",
    "st_rel_u16",
    "st_u8",
    "st_u16",
    "st_u32",
    "st_u64",
    "store_relaxed",
    "unsigned",
    "writev",
]


class Record(Protocol):
    """A row as the kernels see it: every field by name, an integer (``q.last_avail``).

    numba compiles it as a record (a pointer to the row); this protocol is
    what readers and mypy see.
    """

    def __getattr__(self, name: str) -> int: ...

    def __setattr__(self, name: str, value: int) -> None: ...


class Table(Protocol):
    """Rows of one kind, back to back (``segs[i].length``), compiled as a numba record array."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, index: int) -> Record: ...


Load: TypeAlias = Callable[[int], int]
Store: TypeAlias = Callable[[int, int], None]
Copy: TypeAlias = Callable[[int, int], None]
Action: TypeAlias = Callable[[], None]
Syscall1: TypeAlias = Callable[[int], int]
Syscall3: TypeAlias = Callable[[int, int, int], int]
Syscall4: TypeAlias = Callable[[int, int, int, int], int]

# numba's lowering context and code generation helpers carry no annotations (nor does
# llvmlite's IR builder).
Context: TypeAlias = Any
cgutils: Any = _cgutils
# (context, builder, signature, args) -> LLVM value
Codegen: TypeAlias = Callable[[Context, ir.IRBuilder, Signature, Sequence[ir.Value]], ir.Value]


def _intrinsic(typer: Callable[..., tuple[Signature, Codegen] | None], **options: bool) -> Any:
    return intrinsic(**options)(typer) if options else intrinsic(typer)


I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
_X86 = platform.machine() in ("x86_64", "AMD64", "i686")
EPOLL_EVENT_SIZE = 12 if _X86 else 16
"""Bytes of a ``struct epoll_event``: packed on x86-64 (u32 events, then the u64 data)."""
EPOLL_DATA_OFFSET = 4 if _X86 else 8
"""Offset of the event's data (the fd it was registered with) in a ``struct epoll_event``."""

# --------------------------------------------------------------------------- loads and stores


def _ptr(builder: ir.IRBuilder, addr: ir.Value, width: ir.IntType) -> ir.Value:
    return builder.inttoptr(addr, width.as_pointer())


def _load(width: ir.IntType, ordering: str | None) -> Load:
    bits = width.width

    def typer(typingctx: object, addr: types.Type) -> tuple[Signature, Codegen]:
        def codegen(
            context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
        ) -> ir.Value:
            ptr = _ptr(builder, args[0], width)
            if ordering is None:
                value = builder.load(ptr, align=bits // 8)
            else:
                value = builder.load_atomic(ptr, ordering, bits // 8)
            return value if bits == 64 else builder.zext(value, I64)

        return types.int64(types.int64), codegen

    typer.__name__ = typer.__qualname__ = f"ld_u{bits}_{ordering or 'plain'}"
    return cast(Load, _intrinsic(typer))


def _store(width: ir.IntType, ordering: str | None) -> Store:
    bits = width.width

    def typer(typingctx: object, addr: types.Type, value: types.Type) -> tuple[Signature, Codegen]:
        def codegen(
            context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
        ) -> ir.Value:
            ptr = _ptr(builder, args[0], width)
            value = args[1] if bits == 64 else builder.trunc(args[1], width)
            if ordering is None:
                builder.store(value, ptr, align=bits // 8)
            else:
                builder.store_atomic(value, ptr, ordering, bits // 8)
            return context.get_dummy_value()

        return types.void(types.int64, types.int64), codegen

    typer.__name__ = typer.__qualname__ = f"st_u{bits}_{ordering or 'plain'}"
    return cast(Store, _intrinsic(typer))


ld_u8 = _load(I8, None)
ld_u16 = _load(I16, None)
ld_u32 = _load(I32, None)
ld_u64 = _load(I64, None)
ld_acq_u16 = _load(I16, "acquire")
"""Load 16 bits with acquire ordering: what the value publishes may be read after it."""
st_u8 = _store(I8, None)
st_u16 = _store(I16, None)
st_u32 = _store(I32, None)
st_u64 = _store(I64, None)
st_rel_u16 = _store(I16, "release")
"""Store 16 bits with release ordering: what was written before is visible with it."""


def _fence_typer(typingctx: object) -> tuple[Signature, Codegen]:
    def codegen(
        context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
    ) -> ir.Value:
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


fence = cast(Action, _intrinsic(_fence_typer))
"""A sequentially consistent fence (``mfence`` on x86)."""


def _cpu_relax_typer(typingctx: object) -> tuple[Signature, Codegen]:
    def codegen(
        context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
    ) -> ir.Value:
        if _X86:
            fnty = ir.FunctionType(ir.VoidType(), [])
            builder.call(
                cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse2.pause"), []
            )
        return context.get_dummy_value()

    return types.void(), codegen


cpu_relax = cast(Action, _intrinsic(_cpu_relax_typer))
"""Tell the core we are spinning (``pause`` on x86, nothing elsewhere)."""


def _prefetcher(write: int) -> Callable[[int], None]:
    """An intrinsic that starts loading a cache line (``prefetcht0``, or ``prefetchw``)."""

    def typer(typingctx: object, addr: types.Type) -> tuple[Signature, Codegen]:
        def codegen(
            context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
        ) -> ir.Value:
            fnty = ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            rw, keep, data = (ir.Constant(I32, v) for v in (write, 3, 1))
            builder.call(fn, [builder.inttoptr(args[0], I8.as_pointer()), rw, keep, data])
            return context.get_dummy_value()

        return types.void(types.int64), codegen

    typer.__name__ = typer.__qualname__ = "prefetch_write" if write else "prefetch"
    return cast(Callable[[int], None], _intrinsic(typer))


# Prefetches never fault, whatever the address.
prefetch = _prefetcher(0)
prefetch_write = _prefetcher(1)


def _atomic_or_u8_typer(
    typingctx: object, addr: types.Type, value: types.Type
) -> tuple[Signature, Codegen]:
    def codegen(
        context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
    ) -> ir.Value:
        builder.atomic_rmw(
            "or", _ptr(builder, args[0], I8), builder.trunc(args[1], I8), "monotonic"
        )
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


atomic_or_u8 = cast(Store, _intrinsic(_atomic_or_u8_typer))
"""OR a byte atomically: the front-end harvests the dirty log concurrently."""

# --------------------------------------------------------------------------- integers


def _reinterpret(target: types.Integer) -> Callable[[int], int]:
    """An intrinsic taking a 64-bit integer's bits as ``target`` (no conversion, no check)."""

    def typer(typingctx: object, value: types.Type) -> tuple[Signature, Codegen] | None:
        if value not in (types.int64, types.uint64):
            return None

        def codegen(
            context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
        ) -> ir.Value:
            return args[0]

        return target(value), codegen

    typer.__name__ = typer.__qualname__ = f"as_{target}"
    return cast(Callable[[int], int], _intrinsic(typer))


unsigned = _reinterpret(types.uint64)
"""A 64-bit integer as unsigned: comparisons and sums on it are unsigned (device addresses)."""
signed = _reinterpret(types.int64)
"""A 64-bit integer as signed (the int64 bit pattern of a device or host address)."""

# --------------------------------------------------------------------------- copies


def _memcpy_typer(
    typingctx: object, dst: types.Type, src: types.Type, count: types.Type
) -> tuple[Signature, Codegen]:
    def codegen(
        context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
    ) -> ir.Value:
        p8 = I8.as_pointer()
        dst_ptr = builder.inttoptr(args[0], p8)
        src_ptr = builder.inttoptr(args[1], p8)
        cgutils.raw_memcpy(builder, dst_ptr, src_ptr, args[2], 1)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


memcpy = cast(Callable[[int, int, int], None], _intrinsic(_memcpy_typer))
"""``memcpy`` between host addresses (libc's, for long copies)."""


def _copy_fixed(count: int) -> Copy:
    """An intrinsic copying exactly ``count`` bytes: a few unaligned vector moves, no call."""

    def typer(typingctx: object, dst: types.Type, src: types.Type) -> tuple[Signature, Codegen]:
        def codegen(
            context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
        ) -> ir.Value:
            p8 = I8.as_pointer()
            dst_ptr = builder.inttoptr(args[0], p8)
            src_ptr = builder.inttoptr(args[1], p8)
            cgutils.raw_memcpy(builder, dst_ptr, src_ptr, ir.Constant(I64, count), 1)
            return context.get_dummy_value()

        return types.void(types.int64, types.int64), codegen

    typer.__name__ = typer.__qualname__ = f"copy{count}"
    return cast(Copy, _intrinsic(typer))


copy64 = _copy_fixed(64)
copy32 = _copy_fixed(32)
copy16 = _copy_fixed(16)
copy8 = _copy_fixed(8)
copy4 = _copy_fixed(4)
copy2 = _copy_fixed(2)
copy1 = _copy_fixed(1)

# --------------------------------------------------------------------------- views


def _as_record(context: Context, builder: ir.IRBuilder, pointer: ir.Value, record: Any) -> Any:
    return builder.bitcast(pointer, context.get_value_type(record))


def record_at(record: types.Record) -> Callable[[int], Record]:
    """An intrinsic viewing the row at a host address as ``record`` (no owner, no copy)."""

    def typer(typingctx: object, addr: types.Type) -> tuple[Signature, Codegen] | None:
        if not isinstance(addr, types.Integer):
            return None

        def codegen(
            context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
        ) -> ir.Value:
            return builder.inttoptr(args[0], context.get_value_type(record))

        return record(types.int64), codegen

    typer.__name__ = typer.__qualname__ = f"record_at_{record.size}"
    return cast(Callable[[int], Record], _intrinsic(typer))


def record_of(record: types.Record) -> Callable[[object], Record]:
    """An intrinsic taking a row as ``record``: the record itself, or the int64 array Python holds.

    The array must be C-contiguous and hold at least the record's bytes.
    """

    def typer(typingctx: object, row: types.Type) -> tuple[Signature, Codegen] | None:
        if row == record:

            def same(
                context: Context,
                builder: ir.IRBuilder,
                sig: Signature,
                args: Sequence[ir.Value],
            ) -> ir.Value:
                return args[0]

            return record(record), same
        if not (
            isinstance(row, types.Array)
            and row.ndim == 1
            and row.layout == "C"
            and row.dtype == types.int64
        ):
            return None

        def view(
            context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
        ) -> ir.Value:
            data = context.make_array(row)(context, builder, value=args[0]).data
            return _as_record(context, builder, data, record)

        return record(row), view

    typer.__name__ = typer.__qualname__ = f"record_of_{record.size}"
    return cast(Callable[[object], Record], _intrinsic(typer))


def _table(
    context: Context, builder: ir.IRBuilder, record: Any, data: ir.Value, rows: ir.Value
) -> ir.Value:
    """A 1-D C-contiguous array of ``rows`` records at ``data`` (no owner)."""
    arrty = types.Array(record, 1, "C")
    intp = context.get_value_type(types.intp)
    itemsize = ir.Constant(intp, record.size)
    array = context.make_array(arrty)(context, builder)
    context.populate_array(
        array,
        data=builder.bitcast(data, context.get_data_type(record).as_pointer()),
        shape=cgutils.pack_array(builder, [rows]),
        strides=cgutils.pack_array(builder, [itemsize]),
        itemsize=itemsize,
        meminfo=None,
    )
    return array._getvalue()


def records_at(record: types.Record) -> Callable[[int, int], Table]:
    """An intrinsic viewing ``rows`` rows at a host address as a table of ``record``."""

    def typer(typingctx: object, addr: types.Type, rows: types.Type) -> tuple[Signature, Codegen]:
        def codegen(
            context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
        ) -> ir.Value:
            data = builder.inttoptr(args[0], I8.as_pointer())
            return _table(context, builder, record, data, args[1])

        return types.Array(record, 1, "C")(types.int64, types.int64), codegen

    typer.__name__ = typer.__qualname__ = f"records_at_{record.size}"
    return cast(Callable[[int, int], Table], _intrinsic(typer))


def records_of(record: types.Record) -> Callable[[object], Table]:
    """An intrinsic taking a table of ``record``: the table itself, or the 2-D array Python holds.

    The array must be C-contiguous, of the record's field type, one row per
    record (its second dimension the record's field count).
    """
    arrty = types.Array(record, 1, "C")
    field = record.members[0][1]

    def typer(typingctx: object, table: types.Type) -> tuple[Signature, Codegen] | None:
        if table == arrty:

            def same(
                context: Context,
                builder: ir.IRBuilder,
                sig: Signature,
                args: Sequence[ir.Value],
            ) -> ir.Value:
                return args[0]

            return arrty(arrty), same
        if not (
            isinstance(table, types.Array)
            and table.ndim == 2
            and table.layout == "C"
            and table.dtype == field
        ):
            return None

        def view(
            context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
        ) -> ir.Value:
            array = context.make_array(table)(context, builder, value=args[0])
            rows = cgutils.unpack_tuple(builder, array.shape)[0]
            return _table(context, builder, record, array.data, rows)

        return arrty(table), view

    typer.__name__ = typer.__qualname__ = f"records_of_{record.size}"
    return cast(Callable[[object], Table], _intrinsic(typer))


def _field(record: types.Type, name: types.Type) -> int | None:
    """Byte offset of an int64 field named by a string literal, None when there is none."""
    if not (isinstance(record, types.Record) and isinstance(name, types.StringLiteral)):
        return None
    if record.typeof(name.literal_value) != types.int64:
        return None
    return int(record.offset(name.literal_value))


def _load_relaxed_typer(
    typingctx: object, record: types.Type, name: types.Type
) -> tuple[Signature, Codegen] | None:
    offset = _field(record, name)
    if offset is None:
        return None

    def codegen(
        context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
    ) -> ir.Value:
        ptr = cgutils.get_record_member(builder, args[0], offset, I64)
        return builder.load_atomic(ptr, "monotonic", 8)

    return types.int64(record, name), codegen


load_relaxed = cast(
    Callable[[Record, str], int], _intrinsic(_load_relaxed_typer, prefer_literal=True)
)
"""Load the int64 field ``name`` (a literal) that another thread may write meanwhile.

Atomic (never torn) and never hoisted out of the caller's loop.
"""


def _store_relaxed_typer(
    typingctx: object, record: types.Type, name: types.Type, value: types.Type
) -> tuple[Signature, Codegen] | None:
    offset = _field(record, name)
    if offset is None:
        return None

    def codegen(
        context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
    ) -> ir.Value:
        ptr = cgutils.get_record_member(builder, args[0], offset, I64)
        builder.store_atomic(args[2], ptr, "monotonic", 8)
        return context.get_dummy_value()

    return types.void(record, name, types.int64), codegen


store_relaxed = cast(
    Callable[[Record, str, int], None], _intrinsic(_store_relaxed_typer, prefer_literal=True)
)
"""Store the int64 field ``name`` (a literal) that another thread reads meanwhile."""

# --------------------------------------------------------------------------- system calls


def _libc(name: str, params: tuple[ir.IntType, ...], result: ir.IntType) -> Any:
    """An intrinsic calling libc's ``name``: int64 arguments narrowed to ``params``.

    The result is widened back to int64 (sign-extended: -1 stays -1).
    """

    def codegen(
        context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
    ) -> ir.Value:
        fnty = ir.FunctionType(result, list(params))
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        narrow = [
            arg if param.width == 64 else builder.trunc(arg, param)
            for arg, param in zip(args, params, strict=True)
        ]
        value = builder.call(fn, narrow)
        return value if result.width == 64 else builder.sext(value, I64)

    sig = types.int64(*(types.int64 for _ in params))

    # numba reads an intrinsic's arity from its typer's parameters.
    def typer1(typingctx: object, a: types.Type) -> tuple[Signature, Codegen]:
        return sig, codegen

    def typer3(
        typingctx: object, a: types.Type, b: types.Type, c: types.Type
    ) -> tuple[Signature, Codegen]:
        return sig, codegen

    def typer4(
        typingctx: object, a: types.Type, b: types.Type, c: types.Type, d: types.Type
    ) -> tuple[Signature, Codegen]:
        return sig, codegen

    typers: dict[int, Callable[..., tuple[Signature, Codegen]]] = {1: typer1, 3: typer3, 4: typer4}
    typer = typers[len(params)]
    typer.__name__ = typer.__qualname__ = f"libc_{name}"
    return _intrinsic(typer)


# Pointers travel as int64; iovecs are int64 pairs (address, length): struct iovec on
# 64-bit Linux.
epoll_wait = cast(Syscall4, _libc("epoll_wait", (I32, I64, I32, I32), I32))
"""``epoll_wait(epfd, events, maxevents, timeout_ms)``, which blocks without the GIL."""
preadv = cast(Syscall4, _libc("preadv", (I32, I64, I32, I64), I64))
pwritev = cast(Syscall4, _libc("pwritev", (I32, I64, I32, I64), I64))
pwrite = cast(Syscall4, _libc("pwrite", (I32, I64, I64, I64), I64))
fallocate = cast(Syscall4, _libc("fallocate", (I32, I32, I64, I64), I32))
fdatasync = cast(Syscall1, _libc("fdatasync", (I32,), I32))
readv = cast(Syscall3, _libc("readv", (I32, I64, I32), I64))
writev = cast(Syscall3, _libc("writev", (I32, I64, I32), I64))


def _eventfd_io(name: str, value: int) -> Syscall1:
    """An intrinsic doing ``name(fd, &counter, 8)`` on an eventfd, ``counter`` set to ``value``.

    ``write`` with 1 signals the eventfd; ``read`` takes (and so resets) its count.
    """

    def typer(typingctx: object, fd: types.Type) -> tuple[Signature, Codegen]:
        def codegen(
            context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
        ) -> ir.Value:
            slot = cgutils.alloca_once_value(builder, ir.Constant(I64, value))
            buf = builder.ptrtoint(slot, I64)
            fnty = ir.FunctionType(I64, [I32, I64, I64])
            fn = cgutils.get_or_insert_function(builder.module, fnty, name)
            return builder.call(fn, [builder.trunc(args[0], I32), buf, ir.Constant(I64, 8)])

        return types.int64(types.int64), codegen

    typer.__name__ = typer.__qualname__ = f"eventfd_{name}"
    return cast(Syscall1, _intrinsic(typer))


eventfd_signal = _eventfd_io("write", 1)
eventfd_drain = _eventfd_io("read", 0)


def _errno_typer(typingctx: object) -> tuple[Signature, Codegen]:
    def codegen(
        context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
    ) -> ir.Value:
        fnty = ir.FunctionType(I32.as_pointer(), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "__errno_location")
        return builder.sext(builder.load(builder.call(fn, [])), I64)

    return types.int64(), codegen


errno = cast(Callable[[], int], _intrinsic(_errno_typer))
"""The calling thread's ``errno``."""


def _monotonic_ns_typer(typingctx: object) -> tuple[Signature, Codegen]:
    def codegen(
        context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
    ) -> ir.Value:
        timespec = cgutils.alloca_once(builder, ir.ArrayType(I64, 2))
        base = builder.bitcast(timespec, I64.as_pointer())
        fnty = ir.FunctionType(I32, [I32, I64.as_pointer()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "clock_gettime")
        builder.call(fn, [ir.Constant(I32, 1), base])
        seconds = builder.load(base)
        nanos = builder.load(builder.gep(base, [ir.Constant(I32, 1)]))
        return builder.add(builder.mul(seconds, ir.Constant(I64, 1_000_000_000)), nanos)

    return types.int64(), codegen


monotonic_ns = cast(Callable[[], int], _intrinsic(_monotonic_ns_typer))
"""``CLOCK_MONOTONIC`` in nanoseconds (a vDSO call, no system call)."""


def _call_entry_typer(
    typingctx: object, entry: types.Type, a: types.Type, b: types.Type
) -> tuple[Signature, Codegen]:
    def codegen(
        context: Context, builder: ir.IRBuilder, sig: Signature, args: Sequence[ir.Value]
    ) -> ir.Value:
        fnty = ir.FunctionType(I64, [I64, I64])
        return builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [args[1], args[2]])

    return types.int64(types.int64, types.int64, types.int64), codegen


call_entry = cast(Callable[[int, int, int], int], _intrinsic(_call_entry_typer))
"""Call the C entry point ``int64 entry(int64, int64)`` at a host address."""
