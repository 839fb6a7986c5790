"""Known SHA-256 digests of published pretrained checkpoints, by file name.

A ``--teacher`` (or importer ``--source``) given as a URL is only accepted when the downloaded
file's digest matches, either the one passed with ``--sha256`` or the entry here for the URL's
file name. The digest is what makes a download trustworthy: the file's privacy ledger is only as
good as the file, and a URL alone proves nothing about its content.

To add an entry, in the same change that publishes a checkpoint:

1. compute the digest of the exact published file, e.g.
   ``python -c "import privacy, sys; print(privacy.file_sha256(sys.argv[1]))" FILE``
   (or ``sha256sum FILE``);
2. add ``"<file name as it appears at the end of the URL>": "<64 lowercase hex digits>",`` below.

Never fill in a digest computed from a download of unknown origin.
"""
from __future__ import annotations

PRETRAINED_SHA256: dict[str, str] = {}
