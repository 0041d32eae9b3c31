"""The curl upload body: ``multipart/form-data`` with a file field ``model``, optional ``config`` (JSON)
and ``version`` fields, an optional file field ``samples`` (the version's samples.npz) and any number of
file fields ``file`` whose filename is the model-level path (``labels.txt``, ``warmup/<name>``), parsed as
it streams in and handed, part by part, to the upload sink the data plane gives
(:class:`server.dataplane.UploadSink`), which writes it straight into the upload's staging folder (never
held whole in memory, never spooled to /tmp). File bytes are counted against the upload cap as they arrive;
other fields are capped at the request body limit. This edge knows the form, not the repository (it only asks
whether a config is an ensemble's: such an upload is its config, with no model file)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.dataplane import UploadFile, UploadReceiver, UploadSink
from server.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from server.repository.upload import is_ensemble_config

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

FILE_FIELD = "model"
SAMPLES_FIELD = "samples"
EXTRA_FIELD = "file"  # repeated; the part's filename is the path in the model folder
FILE_FIELDS = (FILE_FIELD, SAMPLES_FIELD, EXTRA_FIELD)
TEXT_FIELDS = ("config", "version")
FLUSH_BYTES = 1 << 20  # file data is handed to a worker thread in pieces of about this size


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type (415 for any other type)."""
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise UnsupportedMediaType(
            f"Content-Type {content_type or '(none)'!r}: send multipart/form-data "
            "(curl -F model=@model.onnx [-F config=<config.json] [-F version=N] [-F samples=@samples.npz] "
            "[-F 'file=@labels.txt;filename=labels.txt'])"
        )
    return options[b"boundary"]


def form_receiver(content_type: str, body: AsyncIterator[bytes], max_field_bytes: int) -> UploadReceiver:
    """A receiver that parses the streamed form into the upload sink."""
    boundary = multipart_boundary(content_type)

    async def receive(sink: UploadSink) -> None:
        form = _Form(sink, max_field_bytes)
        parser = MultipartParser(boundary, form.callbacks())
        try:
            async for chunk in body:
                parser.write(chunk)
                await form.drain()
        except MultipartParseError as exc:
            raise InvalidInput(f"multipart body: {exc}") from None
        await form.finish()

    return receive


class _Form:
    """Callbacks of the streaming parser. They run synchronously inside ``parser.write``; file data is
    queued there and written by :meth:`drain` in a worker thread so the event loop never waits on disk."""

    def __init__(self, sink: UploadSink, max_field_bytes: int) -> None:
        self.sink = sink
        self.max_field_bytes = max_field_bytes
        self.headers: dict[bytes, bytes] = {}
        self._header = [b"", b""]
        self.part = ""
        self.file: UploadFile | None = None  # the file part being received
        self.pending: list[tuple[UploadFile, bytes, bool]] = []  # (file, data, close), in order
        self.pending_size = 0
        self.closing = False  # a file part ended: drain now
        self.fields: dict[str, bytearray] = {}
        self.done: set[str] = set()  # file fields given (model, samples) or paths (file)
        self.ended = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_data(0, data[start:end]),
            "on_header_value": lambda data, start, end: self._header_data(1, data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.headers = {}
        self.part = ""

    def _header_data(self, which: int, data: bytes) -> None:
        self._header[which] += data

    def _header_end(self) -> None:
        self.headers[self._header[0].strip().lower()] = self._header[1].strip()
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename", b"").decode("utf-8", "replace")
        once = name in (FILE_FIELD, SAMPLES_FIELD)
        if name in self.fields or (once and name in self.done):
            raise InvalidInput(f"form field {name!r} is given twice")
        if name == FILE_FIELD:
            self.file = self.sink.open_model_file(filename)
        elif name == SAMPLES_FIELD:
            self.file = self.sink.open_samples_file()
        elif name == EXTRA_FIELD:
            if not filename:
                raise InvalidInput(
                    f"form field {EXTRA_FIELD!r} needs a filename, the path in the model folder "
                    f"(curl -F 'file=@local.txt;filename=labels.txt')"
                )
            self.file = self.sink.open_extra_file(filename)
        elif name in TEXT_FIELDS:
            self.fields[name] = bytearray()
        else:
            raise InvalidInput(
                f"form field {name!r} is not known; send {FILE_FIELD!r} and optionally {TEXT_FIELDS}, "
                f"{SAMPLES_FIELD!r} and {EXTRA_FIELD!r} files"
            )
        self.part = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part in FILE_FIELDS:
            assert self.file is not None
            self.sink.count(end - start)
            self.pending.append((self.file, data[start:end], False))
            self.pending_size += end - start
            return
        value = self.fields[self.part]
        value += data[start:end]
        if len(value) > self.max_field_bytes:
            raise PayloadTooLarge(f"form field {self.part!r} exceeds {self.max_field_bytes} bytes")

    def _part_end(self) -> None:
        if self.part in FILE_FIELDS and self.file is not None:
            self.pending.append((self.file, b"", True))
            self.file, self.closing = None, True
            self.done.add(self.part)

    def _end(self) -> None:
        self.ended = True

    async def drain(self) -> None:
        """Write queued file data (in a thread) once enough has piled up or a file part ended."""
        if not self.pending or not (self.closing or self.pending_size >= FLUSH_BYTES):
            return
        queued, self.pending, self.pending_size, self.closing = self.pending, [], 0, False
        await asyncio.to_thread(_write, queued)

    def _ensemble_config(self) -> bool:
        """Whether the form's config is an ensemble's: its upload is the config alone, with no model file."""
        return "config" in self.fields and is_ensemble_config(_text(self.fields["config"], "config"))

    async def finish(self) -> None:
        """After the body: everything required arrived, the text fields go to the sink."""
        await self.drain()
        if not self.ended:
            raise InvalidInput("multipart body ended before its closing boundary")
        if FILE_FIELD not in self.done and not self._ensemble_config():
            raise InvalidInput(f"form field {FILE_FIELD!r} (the ONNX file) is missing")
        if "version" in self.fields:
            self.sink.request_version(_text(self.fields["version"], "version"))
        if "config" in self.fields:
            await asyncio.to_thread(self.sink.set_config, _text(self.fields["config"], "config"))


def _write(queued: list[tuple[UploadFile, bytes, bool]]) -> None:
    """Write runs of data to their files in order, joined per file; close the files whose part ended."""
    run: list[bytes] = []
    for index, (file, data, close) in enumerate(queued):
        run.append(data)
        following = queued[index + 1][0] if index + 1 < len(queued) else None
        if close or following is not file:
            file.write(b"".join(run))
            run = []
        if close:
            file.close()


def _text(value: bytearray, name: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"form field {name!r} must be UTF-8 text") from None
