"""The daemon: twistd options and wiring, lifecycle, systemd, logs, TLS
certificates. The only folder that imports from all the others."""
