"""The upstream side: one request and its redirects, the failover chain,
and reading or relaying upstream bodies."""
