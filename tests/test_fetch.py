"""`--teacher` as a URL: downloaded once, SHA-256 verified, never kept when it does not match.

Every download here comes from a file server on 127.0.0.1 in a thread, or a file:// URL.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

import privacy
import registry
import save_dp_db_stats
import synthesize
from common.errors import DPImgSynError
from common.files import sha256_file
from stages.fetch import PRETRAINED_DIR, PRETRAINED_SHA256, resolve_checkpoint

PAYLOAD = b"checkpoint bytes " * 1000
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
WRONG_SHA256 = "0" * 64


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """A local HTTP server over ``tmp_path/served``; yields (base URL, served folder, request log)."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    served = tmp_path / "served"
    served.mkdir()
    (served / "teacher.dppt").write_bytes(PAYLOAD)
    requests: list[str] = []
    handler = type("Handler", (_QuietHandler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_download_is_verified_kept_and_reused(server, tmp_path):
    base, served, requests = server
    store = tmp_path / "store"
    path = resolve_checkpoint(f"{base}/teacher.dppt", PAYLOAD_SHA256.upper(), directory=store, progress=False)
    assert path == store / "teacher.dppt"
    assert path.read_bytes() == PAYLOAD
    assert requests == ["/teacher.dppt"]
    (served / "teacher.dppt").unlink()  # a second resolve must not need the server
    assert resolve_checkpoint(f"{base}/teacher.dppt", PAYLOAD_SHA256, directory=store, progress=False) == path
    assert requests == ["/teacher.dppt"]
    assert _leftovers(store) == ["teacher.dppt"]


def test_mismatching_download_is_refused_and_not_kept(server, tmp_path):
    base, _, requests = server
    store = tmp_path / "store"
    with pytest.raises(DPImgSynError, match="SHA-256 .* expected 0{64}"):
        resolve_checkpoint(f"{base}/teacher.dppt", WRONG_SHA256, directory=store, progress=False)
    assert requests == ["/teacher.dppt"]
    assert _leftovers(store) == []  # neither the final file nor a temporary one survives


def test_url_without_known_digest_is_refused_before_downloading(server, tmp_path):
    base, _, requests = server
    with pytest.raises(DPImgSynError, match="no SHA-256 digest is known for teacher.dppt; pass --sha256"):
        resolve_checkpoint(f"{base}/teacher.dppt", directory=tmp_path / "store", progress=False)
    assert requests == []
    assert not (tmp_path / "store").exists()


def test_digest_table_is_used_and_must_agree_with_sha256(server, tmp_path, monkeypatch):
    base, _, _ = server
    monkeypatch.setitem(PRETRAINED_SHA256, "teacher.dppt", PAYLOAD_SHA256)
    with pytest.raises(DPImgSynError, match="disagrees with the published digest"):
        resolve_checkpoint(f"{base}/teacher.dppt", WRONG_SHA256, directory=tmp_path / "store", progress=False)
    path = resolve_checkpoint(f"{base}/teacher.dppt", directory=tmp_path / "store", progress=False)
    assert path.read_bytes() == PAYLOAD


def test_existing_file_with_other_content_is_not_replaced(server, tmp_path):
    base, _, requests = server
    store = tmp_path / "store"
    store.mkdir()
    (store / "teacher.dppt").write_bytes(b"someone else's file")
    with pytest.raises(DPImgSynError, match="already exists .* not replaced"):
        resolve_checkpoint(f"{base}/teacher.dppt", PAYLOAD_SHA256, directory=store, progress=False)
    assert (store / "teacher.dppt").read_bytes() == b"someone else's file"
    assert requests == []


def test_http_error_is_a_user_error(server, tmp_path):
    base, _, _ = server
    with pytest.raises(DPImgSynError, match="cannot download .*missing.dppt.*(Not Found|404)"):
        resolve_checkpoint(f"{base}/missing.dppt", PAYLOAD_SHA256, directory=tmp_path / "store", progress=False)
    assert _leftovers(tmp_path / "store") == []


def test_file_url(tmp_path):
    source = tmp_path / "published" / "stats.dppt"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    path = resolve_checkpoint(source.as_uri(), PAYLOAD_SHA256, directory=tmp_path / "store", progress=False)
    assert path.read_bytes() == PAYLOAD
    with pytest.raises(DPImgSynError, match="cannot download"):
        resolve_checkpoint((tmp_path / "absent.dppt").as_uri(), PAYLOAD_SHA256, directory=tmp_path / "s2",
                           progress=False)


def test_local_paths_pass_through_and_are_checked_when_a_digest_is_given(tmp_path):
    local = tmp_path / "teacher.dppt"
    local.write_bytes(PAYLOAD)
    assert resolve_checkpoint(str(local)) == local
    assert resolve_checkpoint(local, PAYLOAD_SHA256) == local
    assert resolve_checkpoint(tmp_path / "not_yet.dppt") == tmp_path / "not_yet.dppt"  # loaders report it
    with pytest.raises(DPImgSynError, match="expected 0{64}"):
        resolve_checkpoint(local, WRONG_SHA256)


@pytest.mark.parametrize(("value", "sha256", "message"), [
    ("ftp://example.org/t.dppt", PAYLOAD_SHA256, "unsupported URL scheme 'ftp'"),
    ("https://example.org/", PAYLOAD_SHA256, "does not end in a file name"),
    ("https://example.org/t.dppt", "abc123", "is not a SHA-256 digest"),
])
def test_bad_urls_and_digests_are_refused_without_network(value, sha256, message, tmp_path):
    with pytest.raises(DPImgSynError, match=message):
        resolve_checkpoint(value, sha256, directory=tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()


def _tiny_checkpoint(path: Path, stage: str) -> str:
    """A valid small `.dppt` (claimed ledger) of ``stage``; returns its digest."""
    model = registry.get_model("small_cnn", 10)
    block = privacy.privacy_block([privacy.claimed_entry("test", 1.0, 1e-5)], 1e-5)
    privacy.save_dppt(path, privacy.dppt_payload(stage, model.state_dict(), "small_cnn", 10, "mnist5k", block))
    return sha256_file(path)


@pytest.mark.parametrize(("stage_cli", "served_stage", "extra", "message"), [
    (save_dp_db_stats, "statistics", [], "has stage 'statistics' but 'teacher' is needed"),
    (synthesize, "teacher", ["--public_set", "photos"], "without DP statistics"),
])
def test_stage_clis_download_the_teacher_url(stage_cli, served_stage, extra, message, server, tmp_path,
                                             monkeypatch):
    """The stage reads the downloaded, verified file (here: one of the wrong stage, to stay fast)."""
    base, served, _ = server
    digest = _tiny_checkpoint(served / "wrong_stage.dppt", served_stage)
    monkeypatch.chdir(tmp_path)
    argv = ["--teacher", f"{base}/wrong_stage.dppt", "--output", str(tmp_path / "out"), "--no_progress", *extra]
    with pytest.raises(DPImgSynError, match=message):
        stage_cli.run(argv + ["--sha256", digest])
    downloaded = tmp_path / PRETRAINED_DIR / "wrong_stage.dppt"
    assert sha256_file(downloaded) == digest
    assert torch.load(downloaded, weights_only=True)["stage"] == served_stage


def test_stage_cli_refuses_a_mismatching_download_in_one_line(server, tmp_path, monkeypatch, capsys):
    base, served, _ = server
    _tiny_checkpoint(served / "stats.dppt", "statistics")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        synthesize.main(["--teacher", f"{base}/stats.dppt", "--sha256", WRONG_SHA256, "--public_set", "photos",
                         "--output", str(tmp_path / "release"), "--no_progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "expected 0000" in err[0]
    assert _leftovers(tmp_path / PRETRAINED_DIR) == []
    assert not (tmp_path / "release").exists()
