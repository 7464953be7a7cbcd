"""The shared store's S3 side: a Twisted-native client (``client``) whose
calls each have a deadline and go through a circuit breaker (``breaker``),
signed by botocore without its I/O (``signing``)."""

from mirrord.store.s3.breaker import Breaker, S3Unavailable
from mirrord.store.s3.client import ObjectInfo, S3Client, S3Error, pack_meta, unpack_meta

__all__ = [
    "Breaker",
    "ObjectInfo",
    "S3Client",
    "S3Error",
    "S3Unavailable",
    "pack_meta",
    "unpack_meta",
]
