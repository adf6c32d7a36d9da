"""gateway.images.form and outgoing on bytes in memory: a client's multipart body in, the
upstream's multipart body out, the spool and its caps. No server."""

from __future__ import annotations

import pytest
from python_multipart.multipart import MultipartParser

from gateway.admission import ANONYMOUS
from gateway.catalog import Catalog
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.images.capacity import Capacity
from gateway.images.form import EditForm, Spool
from gateway.images.outgoing import UpstreamForm
from gateway.images.rules import Bounds
from tests.support.helpers import multipart, suite_settings
from tests.support.images import png

BOUNDARY = "b0undary"


def _body(*parts: tuple[str, str | bytes]) -> bytes:
    return multipart([(name, value, "f.png" if isinstance(value, bytes) else None)
                      for name, value in parts], BOUNDARY)[0]


def _parts(body: bytes, boundary: bytes) -> list[tuple[str, bytes]]:
    """The (name, bytes) of each part of a multipart body, as an upstream would read it."""
    found: list[tuple[str, bytes]] = []
    header = bytearray()
    state: dict[str, bytearray] = {}

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header.extend(data[start:end])

    def on_headers_finished() -> None:
        name = bytes(header).split(b'name="')[1].split(b'"')[0].decode()
        found.append((name, b""))
        state["data"] = bytearray()
        header.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def on_part_end() -> None:
        found[-1] = (found[-1][0], bytes(state["data"]))

    parser = MultipartParser(boundary, {
        "on_header_value": on_header_value, "on_header_end": lambda: header.extend(b";"),
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
    parser.write(body)
    return found


class Harness:
    """A form as the flow drives it, with the client's body fed in `chunk`-byte messages."""

    def __init__(self, **settings: object) -> None:
        self.settings = suite_settings(**settings)
        self.catalog = Catalog.from_settings(self.settings)
        self.capacity = Capacity(self.settings)
        self.spool = Spool(self.settings, self.capacity, "key_1")
        self.out = UpstreamForm()
        self.form = EditForm(self.catalog, self.settings, Bounds.of(self.catalog),
                             BOUNDARY.encode(), ANONYMOUS.models, self.spool, self.out)

    def run(self, body: bytes, chunk: int) -> bytes:
        """The upstream body the flow would send for `body`."""
        form, out = self.form, self.out
        messages = [body[i:i + chunk] for i in range(0, len(body), chunk)]
        live = None
        for i, message in enumerate(messages):
            live = form.spool_events(form.parse(message, i < len(messages) - 1))
            if live is not None:
                rest = messages[i + 1:]
                break
        judged = form.judged or form.judge()
        assert judged is not None
        sent = [b"".join([*out.detach()])]  # the live parts handled so far go after the fields
        early = ["model", "prompt", *judged.sent]
        out.fields(judged.spec, early, judged.values)
        upstream = []
        for chunks in form.spooled():
            upstream.append(out.take())
            upstream += list(chunks)
            out.file_end()
        self.spool.release()
        out.attach(sent)
        if live is not None:
            form.feed(live)
            for j, message in enumerate(rest):
                upstream.append(out.take())
                form.feed(form.parse(message, j < len(rest) - 1))
        values = form.finish()
        out.fields(judged.spec, [n for n in values if n not in early], values)
        out.close()
        upstream.append(out.take())
        return b"".join(upstream)


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
@pytest.mark.parametrize("files_first", [False, True])
def test_the_upstream_gets_normalized_fields_and_identical_image_bytes(chunk: int,
                                                                       files_first: bool) -> None:
    image, mask = png(64, 64, size=5000), png(64, 64, alpha=True)
    fields = [("model", "gpt-image-1"), ("prompt", "a cat"), ("quality", " HIGH ")]
    files = [("image", image), ("mask", mask)]
    body = _body(*(files + fields if files_first else fields + files), ("n", "2"))
    h = Harness()
    sent = h.run(body, chunk)
    parts = dict(_parts(sent, h.out.content_type.split("boundary=")[1].encode()))
    assert parts["model"] == b"gpt-image-1" and parts["quality"] == b"high"
    assert parts["n"] == b"2" and parts["image"] == image and parts["mask"] == mask
    assert h.form.n_changed is not files_first  # n came after streaming began (fields first)
    assert h.capacity.spooled == 0 and h.capacity.spooled_by_key == {}


def test_a_mask_of_other_dimensions_is_refused_mid_stream() -> None:
    body = _body(("model", "gpt-image-1"), ("prompt", "p"), ("image", png(64, 64)),
                 ("mask", png(32, 32, alpha=True)))
    with pytest.raises(InvalidRequest) as caught:
        Harness().run(body, 100)
    assert (caught.value.param, caught.value.code) == ("mask", "invalid_image_dimensions")


def test_spooled_bytes_count_against_the_caps_and_come_back() -> None:
    h = Harness(max_spool_bytes_per_key=2000)
    body = _body(("image", png(64, 64, size=5000)), ("model", "gpt-image-1"), ("prompt", "p"))
    with pytest.raises(ServiceUnavailable) as caught:
        h.run(body, 500)
    assert caught.value.code == "spool_full"
    assert 0 < h.capacity.spooled <= 2000
    h.spool.release()
    assert h.capacity.spooled == 0 and h.capacity.spooled_by_key == {}


def test_a_text_field_sent_as_a_file_is_refused_before_more_is_read() -> None:
    body = _body(("model", "gpt-image-1"), ("prompt", b"not text"))
    with pytest.raises(InvalidRequest) as caught:
        Harness().run(body, 1 << 20)
    assert caught.value.param == "prompt"
