"""The upstream's multipart body, framed piece by piece as the client's parts are accepted.

It judges nothing: the form reader hands it only what has passed the rules, and the flow
yields what it holds once per client message (framing joined to the data around it; a
message that is all file data passes on without a copy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gateway.catalog import ModelSpec
from gateway.multipart import MultipartWriter


class UpstreamForm:
    __slots__ = ("_out", "_writer", "content_type")

    def __init__(self) -> None:
        self._writer = MultipartWriter()
        self.content_type = self._writer.content_type
        self._out: list[bytes] = []

    def fields(self, spec: ModelSpec, names: Iterable[str], values: Mapping[str, str]) -> None:
        """The named fields, except those the model accepts but never sends on (`drop`)."""
        writer, rules = self._writer, spec.fields
        self._out += [writer.field(name, values[name]) for name in names
                      if not (name in rules and rules[name].drop)]

    def file(self, name: str, filename: str, content_type: str, head: bytes | bytearray) -> None:
        """A file part's head, and its first bytes (those read to tell its format)."""
        self._out.append(self._writer.file_head(name, filename, content_type))
        if head:
            self._out.append(head)  # type: ignore[arg-type]  # joined (copied) before it goes

    def data(self, chunk: bytes) -> None:
        self._out.append(chunk)

    def file_end(self) -> None:
        self._out.append(self._writer.file_tail)

    def close(self) -> None:
        self._out.append(self._writer.close())

    def detach(self) -> list[bytes]:
        """Take the pieces out uncopied, to be put back later by `attach` (the flow handles a
        small request's parts before the upstream asks for its first bytes)."""
        out, self._out = self._out, []
        return out

    def attach(self, pieces: list[bytes]) -> None:
        self._out += pieces

    def take(self) -> bytes:
        """What is ready to go upstream (b"" if nothing), as one write."""
        out, self._out = self._out, []
        if len(out) == 1:
            return out[0]
        return b"".join(out)
