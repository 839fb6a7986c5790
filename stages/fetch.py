"""Resolve a checkpoint argument that may be a URL: download it once, verify its SHA-256, keep it locally.

A downloaded checkpoint is trusted for its privacy ledger, so its bytes must be exactly the
published ones: the digest comes from ``--sha256`` or from :data:`PRETRAINED_SHA256`,
a URL without a known digest is refused, and a file whose digest differs never reaches its final
name (the download goes to a temporary file that is renamed only after the check).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tqdm import tqdm

from common.errors import DPImgSynError
from common.files import atomic_path, sha256_file

PRETRAINED_DIR = Path("checkpoints") / "pretrained_DP_models"
URL_SCHEMES = ("http", "https", "file")
DOWNLOAD_TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")

# Known SHA-256 digests of published pretrained checkpoints, by file name. To add an entry, in the same
# change that publishes a checkpoint: compute the digest of the exact published file (``sha256sum FILE``)
# and add ``"<file name as it appears at the end of the URL>": "<64 lowercase hex digits>",``. Never fill in
# a digest computed from a download of unknown origin.
PRETRAINED_SHA256: dict[str, str] = {}


def is_url(value: str) -> bool:
    """Whether ``value`` names a URL (``scheme://...``) rather than a local path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value) is not None


def normalized_sha256(value: str) -> str:
    """A SHA-256 hex digest in lowercase; anything else is a user error."""
    digest = value.strip().lower()
    if not SHA256_PATTERN.fullmatch(digest):
        raise DPImgSynError(f"--sha256 {value!r} is not a SHA-256 digest (64 hexadecimal digits)")
    return digest


def url_file_name(url: str) -> str:
    """The file name at the end of ``url``'s path, where the download is stored."""
    name = Path(unquote(urlsplit(url).path)).name
    if not name or name.startswith("."):
        raise DPImgSynError(f"{url} does not end in a file name; give the checkpoint file's URL")
    return name


def expected_sha256(file_name: str, sha256: str | None) -> str:
    """The digest a download must have: ``sha256`` or the table's entry (they must agree if both exist)."""
    given = normalized_sha256(sha256) if sha256 else None
    known = PRETRAINED_SHA256.get(file_name)
    if given and known and given != known:
        raise DPImgSynError(f"--sha256 {given} disagrees with the published digest {known} of {file_name}; "
                            "check where the digest came from")
    if not (given or known):
        raise DPImgSynError(f"no SHA-256 digest is known for {file_name}; pass --sha256 with the digest "
                            "published alongside the file (a download is never used unverified)")
    return given or known


def _mismatch(what: str, found: str, wanted: str) -> DPImgSynError:
    return DPImgSynError(f"{what} has SHA-256 {found}, expected {wanted}; the file is not the published one "
                         "(corrupt or altered download, or a wrong --sha256)")


def download(url: str, target: Path, sha256: str, progress: bool = True) -> Path:
    """Stream ``url`` into ``target`` atomically; the file only appears if its digest is ``sha256``."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, atomic_path(target) as tmp:
            size = response.headers.get("Content-Length")
            with open(tmp, "wb") as handle, tqdm(total=int(size) if size and size.isdigit() else None,
                                                 unit="B", unit_scale=True, desc=target.name,
                                                 disable=not progress, dynamic_ncols=True) as bar:
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    handle.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != sha256:
                raise _mismatch(f"the download of {url}", digest.hexdigest(), sha256)
    except (OSError, ValueError, http.client.HTTPException) as error:  # URLError and HTTPError are OSErrors
        reason = (f"HTTP {error.code} {error.reason}" if isinstance(error, urllib.error.HTTPError)
                  else getattr(error, "reason", None) or error)
        raise DPImgSynError(f"cannot download {url} ({reason}); check the URL and the network, or download "
                            "the file by hand and pass its local path") from None
    return target


def resolve_checkpoint(value: str | os.PathLike, sha256: str | None = None,
                       directory: str | os.PathLike = PRETRAINED_DIR, progress: bool = True) -> Path:
    """The local path of a checkpoint given as a path or a URL (``http``, ``https``, ``file``).

    A URL is downloaded once into ``directory`` under its file name and verified against
    ``sha256`` or :data:`PRETRAINED_SHA256`; a later call reuses the verified file. A local path
    is returned as it is, after checking ``sha256`` when one is given. An existing file with
    another digest is refused, never overwritten.
    """
    text = os.fspath(value)
    if not is_url(text):
        path = Path(text)
        if sha256:
            wanted = normalized_sha256(sha256)
            if not path.is_file():
                raise DPImgSynError(f"checkpoint {path} not found; check the path")
            if (found := sha256_file(path)) != wanted:
                raise _mismatch(str(path), found, wanted)
        return path
    scheme = urlsplit(text).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise DPImgSynError(f"unsupported URL scheme {scheme!r} in {text}; use {', '.join(URL_SCHEMES)} "
                            "or a local path")
    name = url_file_name(text)
    wanted = expected_sha256(name, sha256)
    target = Path(directory) / name
    if target.exists():
        if (found := sha256_file(target)) != wanted:
            raise DPImgSynError(f"{target} already exists with SHA-256 {found}, not the expected {wanted}; it is "
                                "not replaced: move it away, or check the URL and --sha256")
        print(f"using {target} (already downloaded, SHA-256 verified)")
        return target
    download(text, target, wanted, progress)
    print(f"downloaded {text} to {target} (SHA-256 verified)")
    return target
