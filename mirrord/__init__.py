"""mirrord: a streaming, TLS-terminating mirror for container registries."""

__version__ = "0.1.0"
