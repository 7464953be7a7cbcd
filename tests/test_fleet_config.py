"""``[store]`` and ``[fleet]``: what a fleet member's file may say, and the
one-line errors an operator sees when it says something wrong."""

from __future__ import annotations

import dataclasses

import pytest

from mirrord import config
from mirrord.config import ConfigError, FleetConfig, StoreConfig

S3 = b"""
[store]
backend = "s3"
endpoint = "https://s3.example.net"
bucket = "mirror"
access_key = "AK"
secret_key_file = "/etc/mirrord/s3-secret"
max_size = "2TiB"
redirect = true
"""

FLEET = b"""
[fleet]
redis = "redis://10.0.0.5:6379/2"
advertise = "https://10.0.0.2:443"
secret_file = "/etc/mirrord/fleet-secret"
"""


def test_defaults_keep_one_host_on_its_disk() -> None:
    """Without the tables the store is the disk and there is no fleet."""
    loaded = config.parse(b"", "t")
    assert loaded.store.backend == "disk"
    assert loaded.fleet.redis == ""


def test_an_s3_member_reads_back_what_it_says() -> None:
    loaded = config.parse(S3 + FLEET, "t")
    assert loaded.store.backend == "s3"
    assert loaded.store.max_size == 2 * 2**40
    assert loaded.store.redirect is True
    assert loaded.store.part_size == 16 << 20
    assert loaded.fleet.advertise == "https://10.0.0.2:443"
    assert loaded.fleet.lease_ttl == 30.0


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (b'[store]\nbackend = "minio"\n', "key 'backend' must be one of disk, s3"),
        (b'[store]\nbackend = "s3"\nbucket = "b"\n', "backend \"s3\" needs key 'endpoint'"),
        (
            S3.replace(b"https://s3.example.net", b"s3.example.net"),
            "'endpoint' must be an http:// or https:// URL",
        ),
        (b'[store]\npart_size = "1MiB"\n', "'part_size' must be between 5MiB and 5GiB"),
        (b"[store]\ndeadline = 0\n", "key 'deadline' must be positive"),
        (b'[store]\nendpont = "x"\n', "endpont"),
        (b'[fleet]\nredis = "10.0.0.5:6379"\n', "must be a redis://host:port/db URL"),
        (
            b'[fleet]\nredis = "redis://r:6379/0"\nsecret_file = "/s"\n',
            "'advertise' must be this host's https:// address",
        ),
        (
            b'[fleet]\nredis = "redis://r:6379/0"\nadvertise = "https://h:443"\n',
            "key 'secret_file' is needed",
        ),
        (S3 + b"[cache]\nenabled = false\n", "needs the disk cache"),
    ],
)
def test_a_wrong_fleet_file_is_one_clear_error(text: bytes, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.parse(text, "mirrord.toml")
    assert says in str(raised.value)
    assert str(raised.value).startswith("mirrord.toml")


def test_full_fleet_file_reads_every_key() -> None:
    """Every key of [store] and [fleet] is read, with its type; none keeps
    its default (a key added to either record must be added here)."""
    loaded = config.parse(
        b"""
[store]
backend = "s3"
endpoint = "http://127.0.0.1:7480"
bucket = "b"
region = "default"
prefix = "mirror/"
access_key = "AK"
secret_key_file = "/s3"
tls_ca = "/ca.pem"
redirect = true
redirect_ttl = 60
max_size = "1GiB"
deadline = 4
breaker_failures = 5
breaker_reset = 9
part_size = "8MiB"
[fleet]
redis = "redis://:pw@10.0.0.5:6380/3"
advertise = "https://a.example:8443"
secret_file = "/fleet"
tls_ca = "/fleet-ca.pem"
member = "a"
lease_ttl = 12
deadline = 1.5
""",
        "t",
    )
    assert loaded.store == StoreConfig(
        "s3",
        "http://127.0.0.1:7480",
        "b",
        "default",
        "mirror/",
        "AK",
        "/s3",
        "/ca.pem",
        True,
        60,
        1 << 30,
        4,
        5,
        9,
        8 << 20,
    )
    assert loaded.fleet == FleetConfig(
        "redis://:pw@10.0.0.5:6380/3",
        "https://a.example:8443",
        "/fleet",
        "/fleet-ca.pem",
        "a",
        12,
        1.5,
    )
    for record, default in ((loaded.store, StoreConfig()), (loaded.fleet, FleetConfig())):
        for f in dataclasses.fields(record):
            assert getattr(record, f.name) != getattr(default, f.name), f.name
