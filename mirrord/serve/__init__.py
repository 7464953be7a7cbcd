"""Serving /v2/ and /token: the /v2/ resource, pass-through, the cache path
(blobs, manifests, privacy) and the token relay."""
