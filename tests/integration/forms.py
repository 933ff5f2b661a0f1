"""multipart/form-data bodies built by hand, so tests can send exactly what a hostile or broken
client would (file names with `../`, empty parts, missing fields), and a urllib POST."""
from __future__ import annotations

import urllib.request
import uuid
from dataclasses import dataclass

from tests.integration.daemon_proc import request_json


@dataclass
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str = "application/octet-stream"


def multipart(parts: list[Part]) -> tuple[bytes, str]:
    """(body, Content-Type header value)."""
    boundary = uuid.uuid4().hex
    out = []
    for p in parts:
        disp = f'form-data; name="{p.name}"'
        if p.filename is not None:
            disp += f'; filename="{p.filename}"'
        out.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n"
                   f"Content-Type: {p.content_type}\r\n\r\n".encode() + p.data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def post(url: str, body: bytes, content_type: str | None, timeout: float = 60.0,
         key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    if content_type is not None:
        req.add_header("Content-Type", content_type)
    return request_json(req, timeout)


def post_form(url: str, parts: list[Part], timeout: float = 60.0, key: str | None = None
              ) -> tuple[int, dict]:
    return post(url, *multipart(parts), timeout=timeout, key=key)


def get(url: str, key: str | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    req = urllib.request.Request(url)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    return request_json(req, timeout)
