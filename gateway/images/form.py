"""A multipart edit, part by part: fields gathered until the model is known, files meanwhile in
a spool; then each part judged (gateway.images.rules) and handed to the upstream form as it comes.

Text fields that come before the files are judged before any byte goes upstream; files that
come before the fields wait in the spool until the model and prompt are known. A file's format
and dimensions are told from its first bytes, so an image is judged before its head goes on.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from gateway.catalog import Catalog
from gateway.errors import InvalidRequest
from gateway.images import rules
from gateway.images.capacity import Capacity
from gateway.images.outgoing import UpstreamForm
from gateway.images.rules import IMAGE, MASK, Bounds, Judged
from gateway.multipart import PART_DATA, PART_START, MultipartReader, Part
from gateway.settings import Settings
from gateway.sniff import SNIFF_LIMIT, ImageError, ImageInfo, sniff

_IMAGE_NAME = re.compile(r"image(\[\d*\])?")
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
Events = list[tuple[int, Any]]


@dataclass(slots=True)
class Upload:
    """One file part: where it is in the request and what its bytes turned out to be."""

    kind: str  # IMAGE | MASK
    param: str  # how errors name it: image, image[1], mask
    index: int
    head: bytes | bytearray  # bytes kept until the header is sniffed
    sniffed: int = 0  # len(head) at the last sniff
    info: ImageInfo | None = None
    size: int = 0
    spooled: bool = False  # its bytes wait in the spool
    spool_start: int = 0

    @property
    def filename(self) -> str:
        ext = _EXTENSIONS[self.info.format] if self.info else "bin"
        return f"mask.{ext}" if self.kind == MASK else f"image_{self.index}.{ext}"


class Spool:
    """Files that came before the fields, held (memory, then an unnamed temp file) and
    counted against the instance's and the key's spool caps until replayed or released."""

    __slots__ = ("_capacity", "_file", "_key", "_settings", "held")

    def __init__(self, settings: Settings, capacity: Capacity, key: str | None) -> None:
        self._settings = settings
        self._capacity = capacity
        self._key = key
        self._file: IO[bytes] | None = None
        self.held = 0

    def tell(self) -> int:
        return self._open().tell()

    def write(self, data: bytes) -> None:
        self._capacity.spool_take(self._key, len(data))
        self.held += len(data)
        self._open().write(data)

    def replay(self, start: int, size: int) -> Iterator[bytes]:
        assert self._file is not None
        self._file.seek(start)
        while size:
            chunk = self._file.read(min(size, 256 * 1024))
            size -= len(chunk)
            yield chunk

    def release(self) -> None:
        if self.held:
            self._capacity.spool_give(self._key, self.held)
            self.held = 0
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    def _open(self) -> IO[bytes]:
        if self._file is None:
            # An unnamed temp file (O_TMPFILE, mode 0600) once past the memory bound: nothing to
            # clean up even if the process dies. Writes hit the page cache, so they stay inline.
            memory, where = self._settings.spool_memory_bytes, self._settings.spool_dir
            self._file = (  # closed in release()
                tempfile.SpooledTemporaryFile(max_size=memory, dir=where)  # noqa: SIM115
                if memory else tempfile.TemporaryFile(dir=where))  # noqa: SIM115
        return self._file


class EditForm:
    """The client's parts as the rules see them. `spool_events` runs until the fields can be
    judged; from then on `feed` passes accepted bytes to `out`, the upstream form."""

    __slots__ = ("_part", "_reader", "_text", "_upload", "allowed_models", "bounds", "catalog",
                 "fields", "first_image_name", "image_field", "images", "judged", "n_changed", "out",
                 "parsed", "prompt", "settings", "spool", "text_bytes", "uploads")

    def __init__(self, catalog: Catalog, settings: Settings, bounds: Bounds, boundary: bytes,
                 allowed_models: tuple[str, ...], spool: Spool, out: UpstreamForm) -> None:
        self.catalog = catalog
        self.settings = settings
        self.bounds = bounds
        self.allowed_models = allowed_models
        self.spool = spool
        self.out = out
        self._reader = MultipartReader(boundary, max_parts=settings.max_parts,
                                       max_header_bytes=settings.max_part_header_bytes)
        self.fields: dict[str, str] = {}  # raw text fields before the model is known
        self.judged: Judged | None = None  # once the model is known: the fields, judged
        self.prompt: str | None = None  # for the access log, once judged
        self.uploads: list[Upload] = []
        self.images = 0
        self.first_image_name = ""
        self.image_field = ""  # the upstream name of image parts, once decided
        self.parsed = False  # every part of the body handled
        self.n_changed = False  # `n` arrived after the fields were judged
        self._part: Part | None = None
        self._text = bytearray()
        self.text_bytes = 0
        self._upload: Upload | None = None

    # ----------------------------------------------------------------------------- reading
    def parse(self, chunk: bytes, more: bool) -> Events:
        """The multipart events of one body message (the last one closes the body)."""
        events = self._reader.feed(chunk)
        if not more:
            self._reader.close()
        return events

    def spool_events(self, events: Events) -> Events | None:
        """Handle events while the model is unknown (files go to the spool). At a file part
        once the fields judge valid: the events after its start, which stream live; else None."""
        for i, (kind, payload) in enumerate(events):
            if kind == PART_START:
                ready = payload.is_file and self._ready()
                self._start_part(payload)  # spooled, or with `ready` the first live part
                if ready:
                    return events[i + 1:]
            elif kind == PART_DATA:
                self._part_data(payload)
            else:
                self._end_part()
        return None

    def feed(self, events: Events) -> None:
        """Handle events once the model is known, passing what goes upstream to `out`."""
        for kind, payload in events:
            if kind == PART_DATA:
                self._part_data(payload)
            elif kind == PART_START:
                self._start_part(payload)
            else:
                self._end_part()

    def judge(self, *, final: bool = True) -> Judged | None:
        """Judge the text fields read so far against the model (and the images read so far);
        None if not `final` and their combination is not valid yet."""
        spec, requested, allowed_as = rules.judge_model(self.catalog, self.allowed_models,
                                                        self.fields)
        self.prompt = rules.judge_prompt(spec, self.fields.get("prompt"))
        judged = rules.judge_fields(self.catalog, spec, self.fields, final=final,
                                    prompt=self.prompt)
        if judged is None:
            return None
        judged.requested, judged.allowed_as = requested, allowed_as
        self.judged, self.fields = judged, {}
        for upload in self.uploads:
            if upload.info is not None:
                rules.judge_image(spec, upload.kind, upload.param, upload.info)
            rules.judge_size(spec, upload.kind, upload.param, upload.size, self.bounds)
        self._judge_mask()
        rules.judge_total(spec, self.images)
        return judged

    def finish(self) -> dict[str, str]:
        """The checks only the whole body allows; the final values, defaults included."""
        assert self.judged is not None
        self.parsed = True
        if self.images == 0:
            raise InvalidRequest("Missing required parameter: 'image'.", param="image",
                                 code="missing_required_parameter")
        self._judge_mask()
        return rules.final_values(self.judged, mask=any(u.kind == MASK for u in self.uploads))

    def spooled(self) -> Iterator[Iterator[bytes]]:
        """The spooled files' bytes in order, each file's head put to `out` first."""
        for upload in self.uploads:
            if upload.spooled:
                self._file_head(upload)
                yield self.spool.replay(upload.spool_start, upload.size)

    def _ready(self) -> bool:
        """Fields are final enough to stream: the model and prompt seen and the combination
        valid. One that fails may still be fixed by a later field (curl sends fields in any
        order), so it keeps the request spooling; the end of the body decides."""
        if "prompt" not in self.fields or "model" not in self.fields:
            return False  # the upstream never opens before the model (and its rules) is known
        return self.judge(final=False) is not None

    # ------------------------------------------------------------------------------ parts
    def _start_part(self, part: Part) -> None:
        self._part = part
        name = part.name
        is_image = _IMAGE_NAME.fullmatch(name) is not None
        if is_image or name == MASK:
            if not part.is_file:
                raise InvalidRequest(f"'{name}' must be a file.", param=name)
            if part.filename and len(part.filename) > self.settings.max_filename_chars:
                raise InvalidRequest("File name is too long.", param=name)
            self._upload = self._new_upload(IMAGE if is_image else MASK, name)
        elif part.is_file:
            raise InvalidRequest(f"'{name}' must be a text field, not a file.", param=name)
        else:
            if name in self.fields or (self.judged is not None and name in self.judged.sent):
                raise InvalidRequest(f"Duplicate parameter: '{name}'.", param=name,
                                     code="duplicate_parameter")
            if self.judged is None and self.catalog.unknown_field(name):
                # No model takes it: refused now, not after the rest of the upload is read.
                raise InvalidRequest(f"Unknown parameter: '{name}'.", param=name,
                                     code="unknown_parameter")
            self._text.clear()

    def _new_upload(self, kind: str, client_name: str) -> Upload:
        spec = self.judged.spec if self.judged else None
        if kind == MASK:
            if any(u.kind == MASK for u in self.uploads):
                raise InvalidRequest("Duplicate parameter: 'mask'.", param="mask",
                                     code="duplicate_parameter")
            upload = Upload(MASK, "mask", 0, b"")
        else:
            index = self.images
            self.images += 1
            if index == 0:
                self.first_image_name = client_name
            param = "image" if index == 0 and client_name == "image" else f"image[{index}]"
            rules.judge_count(spec, index, param, self.bounds)
            if self.image_field == "image":
                raise InvalidRequest(
                    "Duplicate parameter: 'image'. Send several images as 'image[]', or send the"
                    " files before the text fields.", param=param, code="duplicate_parameter")
            upload = Upload(IMAGE, param, index, b"")
        if spec is None:
            upload.spooled = True
            upload.spool_start = self.spool.tell()
        elif kind == MASK:
            rules.mask_supported(spec)
        self.uploads.append(upload)
        return upload

    def _part_data(self, data: bytes) -> None:
        upload = self._upload
        if upload is None:
            self._text += data
            self.text_bytes += len(data)
            assert self._part is not None
            if len(self._text) > self.settings.max_field_bytes:
                raise InvalidRequest(f"'{self._part.name}' is too long.", param=self._part.name,
                                     code="string_above_max_length")
            if self.text_bytes > self.settings.max_text_bytes:
                raise InvalidRequest(
                    f"The text fields are longer than {self.settings.max_text_bytes} bytes "
                    "together.", param=self._part.name, code="text_too_large")
            return
        upload.size += len(data)
        spec = self.judged.spec if self.judged is not None else None
        live = spec is not None
        rules.judge_size(spec, upload.kind, upload.param, upload.size, self.bounds)
        if upload.info is None:
            # Usually the first chunk holds the whole header: keep a reference, copy only if not.
            if not upload.head:
                upload.head = data
            else:
                if not isinstance(upload.head, bytearray):
                    upload.head = bytearray(upload.head)
                upload.head += data
            # Re-walk the header only when the buffer has doubled: a header dribbled in tiny
            # chunks must not cost quadratic time.
            if len(upload.head) >= min(2 * upload.sniffed, SNIFF_LIMIT):
                upload.sniffed = len(upload.head)
                self._sniff(upload, final=False)
            if upload.info is not None:
                if live:
                    self._file_head(upload)
                upload.head = b""
        elif live:
            self.out.data(data)
        if not live:
            self.spool.write(data)

    def _end_part(self) -> None:
        upload, self._upload = self._upload, None
        if upload is None:
            assert self._part is not None
            name = self._part.name
            try:
                value = self._text.decode()
            except UnicodeDecodeError:
                raise InvalidRequest(f"'{name}' is not valid UTF-8.", param=name) from None
            if self.judged is None:
                self.fields[name] = value
            else:
                rules.judge_late_field(self.catalog, self.judged, name, value)
                # A late `n` extends the reservation before the upstream request completes.
                self.n_changed = self.n_changed or name == "n"
            return
        if upload.info is None:
            self._sniff(upload, final=True)
            if self.judged is not None:
                self._file_head(upload)
            upload.head = b""
        if self.judged is not None:
            self._judge_mask()
            self.out.file_end()

    def _sniff(self, upload: Upload, *, final: bool) -> None:
        try:
            upload.info = sniff(upload.head, final=final)
        except ImageError as exc:
            raise InvalidRequest(f"Invalid '{upload.param}': {exc}.", param=upload.param,
                                 code="invalid_image_format") from None
        if upload.info is not None and self.judged is not None:
            rules.judge_image(self.judged.spec, upload.kind, upload.param, upload.info)

    def _judge_mask(self) -> None:
        mask = next((u for u in self.uploads if u.kind == MASK), None)
        first = next((u for u in self.uploads if u.kind == IMAGE), None)
        if self.judged is not None and mask is not None and first is not None:
            rules.judge_mask(self.judged.spec, mask.info, first.info)

    # ------------------------------------------------------------------------------ output
    def _file_head(self, upload: Upload) -> None:
        """A file's part head (and its sniffed first bytes) to `out`. Image parts go as `image`
        for one image, `image[]` for several, decided before the first image goes."""
        assert upload.info is not None and self.judged is not None
        if upload.kind == MASK:
            name = "mask"
        else:
            if not self.image_field:
                alone = self.images == 1 and (self.parsed or self.first_image_name == "image")
                self.image_field = \
                    "image" if self.judged.spec.max_images == 1 or alone else "image[]"
            name = self.image_field
        self.out.file(name, upload.filename, upload.info.content_type, upload.head)
