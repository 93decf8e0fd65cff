"""Multipart forms that survive one part with a header that is not UTF-8.

Werkzeug decodes each part's headers as strict UTF-8, and one UnicodeDecodeError drops the whole
form: an upload of two files, one named b"\\xe9t\\xe9.png" (Latin-1), came back as "no_images".
Here such bytes are kept as surrogate escapes, so the other files go ahead and web/submit.py
fails the one file with its reason (`bad_filename`). Werkzeug offers no hook for the header
decoding (it builds its MultipartDecoder by name inside MultiPartParser.parse), hence the
decoder subclass installed in werkzeug.formparser below.
"""

from __future__ import annotations

from flask import Request
from werkzeug import formparser
from werkzeug.datastructures import Headers
from werkzeug.sansio.multipart import HEADER_CONTINUATION_RE, MultipartDecoder


class TolerantMultipartDecoder(MultipartDecoder):
    def _parse_headers(self, data: bytes | bytearray) -> Headers:
        headers = []
        for line in HEADER_CONTINUATION_RE.sub(b" ", data).splitlines():
            line = line.strip(b" \t")
            if line:
                name, _, value = line.decode("utf-8", "surrogateescape").partition(":")
                headers.append((name.strip(" \t"), value.strip(" \t")))
        return Headers(headers)


formparser.MultipartDecoder = TolerantMultipartDecoder


def has_undecodable(text: str) -> bool:
    """True if text holds bytes that were not UTF-8 (as surrogate escapes)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


class TolerantRequest(Request):
    """The app's request class (it keeps this module's decoder in place wherever it is used)."""
