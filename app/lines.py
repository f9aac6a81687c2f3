"""Lines of a file in the shared folder, in bounded memory, whatever the file holds.

Every stage reads its input through `LineReader`: no line longer than MAX_LINE_BYTES is ever
held whole. A longer one comes out as a `TooLarge` marker (its length and its first bytes) and
is read past in pieces, so one enormous line costs one rejected record, not the machine. A
UTF-8 byte-order mark at the very start (what common Windows tools write) is skipped and
counted, so the first line is read as the event it is.

The reading is the buffered reader's own `readline` with a limit, so the common case (a line
that ends in `\\n`) costs no Python per line beyond the caller's loop: the splitter, which
handles ~1M lines/s, iterates `pieces` itself and calls `finish` only for a piece that does not
end in `\\n` (the file's last line, or the head of a line over the limit).

`json_depth` measures how deep a JSON text nests, without a parser's recursion: the limit
MAX_JSON_DEPTH keeps every stage's parser and serializer (and the shard database's JSON
column) within reach of every accepted line.
"""
from __future__ import annotations

import re
from functools import partial
from itertools import accumulate
from typing import BinaryIO, Iterator

BOM = b"\xef\xbb\xbf"
PREFIX_BYTES = 1024        # what a rejected record keeps of a line over the limit
SKIP_PIECE = 1 << 20       # bytes read at a time while reading past such a line


class TooLarge(bytes):
    """Stands in for a line longer than the limit: its value is the line's first PREFIX_BYTES
    bytes (never ending in `\\n`), `size` the whole line's length without its `\\n`."""

    size: int
    limit: int

    def __new__(cls, prefix: bytes, size: int, limit: int) -> "TooLarge":
        obj = super().__new__(cls, prefix)
        obj.size = size
        obj.limit = limit
        return obj

    @property
    def detail(self) -> str:
        return f"{self.size} bytes, over the limit of {self.limit} (MAX_LINE_BYTES)"


class LineReader:
    """The lines of a buffered binary file (`open(path, "rb")`), each at most `limit` bytes
    before its `\\n`; a longer line is a `TooLarge`. Lines keep their `\\n` (and a `\\r`
    before it); the last one may have none."""

    def __init__(self, f: BinaryIO, limit: int):
        self.f = f
        self.limit = limit
        self.too_large = 0
        # peek fills the buffer on a fresh reader, so a BOM split over two reads cannot happen
        # on a regular file.
        self.bom = f.peek(len(BOM))[:len(BOM)] == BOM
        if self.bom:
            f.read(len(BOM))
        # The hot path: C readline, at most limit + 1 bytes (one more than a line may have,
        # so a piece of that length without `\n` is a line over the limit).
        self.pieces: Iterator[bytes] = iter(partial(f.readline, limit + 1), b"")

    def finish(self, piece: bytes) -> bytes:
        """A piece from `pieces` that does not end in `\\n`: the file's last line (returned as
        it is), or the head of a line over the limit, whose rest is read past here in pieces of
        at most SKIP_PIECE bytes; a TooLarge takes its place."""
        if len(piece) <= self.limit:
            return piece
        size = len(piece)
        readline = self.f.readline
        while more := readline(SKIP_PIECE):
            if more[-1] == 10:
                size += len(more) - 1
                break
            size += len(more)
        self.too_large += 1
        return TooLarge(piece[:PREFIX_BYTES], size, self.limit)

    def __iter__(self) -> Iterator[bytes]:
        finish = self.finish
        for piece in self.pieces:
            yield piece if piece[-1] == 10 else finish(piece)

    def take(self, n: int, max_bytes: int | None = None) -> list[bytes]:
        """The next `n` lines, or fewer: at the end of the file, or once they hold `max_bytes`
        (a batch of long lines stays small)."""
        out: list[bytes] = []
        if n <= 0:
            return out
        size = 0
        cap = max_bytes if max_bytes is not None else -1
        finish = self.finish
        append = out.append
        for piece in self.pieces:
            if piece[-1] != 10:
                piece = finish(piece)
            append(piece)
            if len(out) >= n:
                break
            if cap >= 0:
                size += len(piece)
                if size >= cap:
                    break
        return out

    def at_end(self) -> bool:
        return not self.f.peek(1)


# -- nesting -------------------------------------------------------------------------------------

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def json_depth(text: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (`{"a":[1]}` is 2), counting no
    bracket inside a string. Linear, no recursion: safe on any input. For text that is not
    JSON, the deepest any parser would have to go before finding out."""
    brackets = _STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def too_deep(text: bytes, max_depth: int) -> bool:
    """Whether `text` nests deeper than `max_depth`. Cheap for event lines: without `[` and
    with at most `max_depth` `{`, it cannot, and only other lines are measured."""
    if 91 not in text and text.count(123) <= max_depth:
        return False
    return json_depth(text) > max_depth
