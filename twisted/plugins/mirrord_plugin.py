"""twistd plugin: ``twistd mirrord``. The module is loaded lazily by twistd."""

from twisted.application.service import ServiceMaker

mirrord = ServiceMaker(
    "mirrord",
    "mirrord.daemon.tap",
    "A streaming TLS pull-through mirror for Docker Hub and other registries.",
    "mirrord",
)
