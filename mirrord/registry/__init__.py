"""The registry protocol, pure: references, routing, errors, the headers
that cross, Bearer challenges, JSON error answers."""
