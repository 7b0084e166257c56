"""Fixed-width fields read off the front of a fuzzer's input.

A fuzzer's mutations work best on inputs whose bytes keep their meaning:
each field takes a fixed number of bytes, and an input that runs out
reads zeros, so every input decodes to something.
"""

from __future__ import annotations

__all__ = ["Reader"]


class Reader:
    """Reads little-endian unsigned fields and byte strings from ``data``."""

    __slots__ = ("_at", "_data")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, length: int) -> bytes:
        """The next ``length`` bytes, zero-padded past the end of the input."""
        chunk = self._data[self._at : self._at + length]
        self._at += length
        return chunk + bytes(length - len(chunk))

    def uint(self, width: int) -> int:
        """The next ``width``-byte unsigned integer."""
        return int.from_bytes(self.take(width), "little")

    def u8(self) -> int:
        """The next byte."""
        return self.uint(1)

    def u16(self) -> int:
        """The next 16-bit unsigned integer."""
        return self.uint(2)

    def u64(self) -> int:
        """The next 64-bit unsigned integer."""
        return self.uint(8)

    def rest(self) -> bytes:
        """Everything not read yet."""
        chunk = self._data[self._at :]
        self._at = len(self._data)
        return chunk

    @property
    def exhausted(self) -> bool:
        """Whether every byte of the input has been read."""
        return self._at >= len(self._data)
