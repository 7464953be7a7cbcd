"""What the hosts of a fleet agree on through Redis: who fills a digest
(``leases``), who is alive and where (``members``), and what the shared
store holds with its last access (``index``), over one bounded client
(``redis``). Every call fails with ``FleetUnavailable`` within its deadline
when Redis is down, so a host can always fall back to working alone."""
