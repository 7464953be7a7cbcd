"""The session's Ceph RGW (tests/support/rgw.py) is real S3: it checks
signatures, serves ranges, multipart uploads and conditional writes, over
HTTP and HTTPS, and hangs (rather than fails) while its OSD is frozen."""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from dataclasses import replace
from pathlib import Path

import pytest


def test_put_then_get_signed_over_http_and_https(rgw) -> None:
    """An object put with a signed request reads back the same, on both endpoints."""
    bucket = rgw.bucket()
    body = os.urandom(1000)
    put = rgw.request("PUT", f"/{bucket}/a/b c", body)
    assert put.status == 200, put
    assert put.headers["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    assert rgw.request("GET", f"/{bucket}/a/b c").body == body
    assert rgw.tls_endpoint and rgw.tls_endpoint.startswith("https://127.0.0.1:")
    assert rgw.request("GET", f"/{bucket}/a/b c", tls=True).body == body


def test_signatures_are_checked_and_either_region_name_is_accepted(rgw) -> None:
    """A wrong secret is refused; "us-east-1" and "default" both sign valid requests."""
    bucket = rgw.bucket()
    assert rgw.request("PUT", f"/{bucket}/k", b"x").status == 200
    for region in ("us-east-1", "default"):
        assert rgw.request("GET", f"/{bucket}/k", region=region).status == 200
    forged = replace(rgw, secret_key="not-the-secret")
    assert forged.request("GET", f"/{bucket}/k").status == 403


def test_range_get(rgw) -> None:
    """A Range GET answers 206 with just those bytes, a suffix range too."""
    bucket = rgw.bucket()
    body = bytes(range(256)) * 4
    rgw.request("PUT", f"/{bucket}/r", body)
    middle = rgw.request("GET", f"/{bucket}/r", headers={"Range": "bytes=10-19"})
    assert (middle.status, middle.body) == (206, body[10:20])
    assert middle.headers["Content-Range"] == f"bytes 10-19/{len(body)}"
    suffix = rgw.request("GET", f"/{bucket}/r", headers={"Range": "bytes=-5"})
    assert (suffix.status, suffix.body) == (206, body[-5:])


def test_multipart_upload_is_visible_only_after_complete(rgw) -> None:
    """Parts uploaded under an upload id make no object until CompleteMultipartUpload."""
    bucket = rgw.bucket()
    key = f"/{bucket}/multi"
    created = rgw.request("POST", f"{key}?uploads")
    assert created.status == 200, created
    upload = re.search(rb"<UploadId>(.+?)</UploadId>", created.body).group(1).decode()
    upload_q = urllib.parse.quote(upload, safe="")
    parts = [os.urandom(5 << 20), os.urandom(1000)]  # all but the last >= 5 MiB
    etags = []
    for number, part in enumerate(parts, 1):
        answer = rgw.request("PUT", f"{key}?partNumber={number}&uploadId={upload_q}", part)
        assert answer.status == 200, answer
        etags.append(answer.headers["ETag"])
    assert rgw.request("GET", key).status == 404
    complete = "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
        for n, etag in enumerate(etags, 1)
    )
    done = rgw.request(
        "POST",
        f"{key}?uploadId={upload_q}",
        f"<CompleteMultipartUpload>{complete}</CompleteMultipartUpload>".encode(),
    )
    assert done.status == 200, done
    got = rgw.request("GET", key, timeout=30)
    assert (got.status, got.body == b"".join(parts)) == (200, True)


def test_if_none_match_star_put_answers_412_when_present(rgw) -> None:
    """The first create-only PUT wins; the second is refused with 412 and changes nothing."""
    bucket = rgw.bucket()
    only = {"If-None-Match": "*"}
    assert rgw.request("PUT", f"/{bucket}/lock", b"first", only).status == 200
    assert rgw.request("PUT", f"/{bucket}/lock", b"second", only).status == 412
    assert rgw.request("GET", f"/{bucket}/lock").body == b"first"


def test_a_frozen_osd_makes_gets_hang_until_thawed(rgw) -> None:
    """While the OSD is stopped a GET neither answers nor fails (the client's
    3 s timeout ends it); after the thaw the same GET answers."""
    bucket = rgw.bucket()
    rgw.request("PUT", f"/{bucket}/f", b"frozen")
    rgw.freeze_osd()
    try:
        with pytest.raises(TimeoutError):
            rgw.request("GET", f"/{bucket}/f", timeout=3)
    finally:
        rgw.thaw_osd()
    assert rgw.request("GET", f"/{bucket}/f", timeout=10).body == b"frozen"


def test_daemons_are_running(rgw) -> None:
    """mon, osd and rgw each have a live PID of their own."""
    pids = rgw.pids
    assert sorted(pids) == ["mon", "osd", "rgw"]
    assert len(set(pids.values())) == 3
    for pid in pids.values():
        os.kill(pid, 0)


def test_a_start_that_runs_out_of_time_says_why_and_leaves_no_daemon(tmp_path) -> None:
    """A start cut short by its bound raises with the logs and stops what it had started."""
    from tests.support.rgw import Rgw, RgwError

    directory = tmp_path / "short"
    with pytest.raises(RgwError, match="--- ") as raised:
        Rgw.start(directory, timeout=0.7)
    assert "mon.a.log" in str(raised.value)
    left = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and str(directory).encode() in cmdline:
            left.append(cmdline.replace(b"\0", b" "))
    assert left == []
