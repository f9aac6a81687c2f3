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

`too_deep` says whether a JSON text nests deeper than a limit, without a parser's recursion:
MAX_JSON_DEPTH keeps every stage's parser and serializer (and the shard database's JSON
column) within reach of every accepted line.
"""
from __future__ import annotations

from functools import partial
from typing import BinaryIO, Iterator

BOM = b"\xef\xbb\xbf"
READ_BUFFER = 1 << 20      # the buffered reader's size for the splitter's and the worker's input
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

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_PARENS = bytes.maketrans(b"[{]}", b"(())")


def too_deep(text: bytes, max_depth: int) -> bool:
    """Whether the arrays and objects of a JSON text nest deeper than `max_depth`
    (`{"a":[1]}` nests 2 deep), brackets inside strings not counted. Cheap for event lines:
    without `[` and with at most `max_depth` `{` a text cannot, and only others are measured.

    No parser, no recursion, nothing quadratic (a regular expression for strings with escapes
    would retry every quote of an unterminated string to its end), at worst about 0.1 s per MiB
    of brackets: escapes go first, strings are what lies between two quotes; a text is too
    deep when `max_depth + 1` brackets open in a row, or when a pair is left after `max_depth`
    passes that each drop every innermost pair."""
    if 91 not in text and (text.find(123, 1) < 0 or text.count(123) <= max_depth):
        return False
    if 92 in text:
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    if 34 in text:
        text = b"".join(text.split(b'"')[::2])
    brackets = text.translate(None, _NOT_BRACKETS).translate(_PARENS)
    if b"(" * (max_depth + 1) in brackets:   # the usual attack, found in one search
        return True
    for _ in range(max_depth):
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):
            return False
        brackets = shorter
    return b"()" in brackets
