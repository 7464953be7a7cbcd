"""The front door: the HTTP site and channel, admission (allow-list, limits,
user agents, mirror login), the access log and the usage page."""
