"""The store: blobs and tag records on disk, fills (one upstream body
becoming one verified blob), the disk and hash worker, fetches in flight."""
