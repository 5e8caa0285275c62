"""The makemore data: the pipeline (vocabulary, contexts, the notebooks' split) and finding or
downloading names.txt. Downloads come from an http.server on 127.0.0.1; no test uses an outside
network (an autouse fixture points the default URL at a closed local port and the cache at tmp_path)."""

import hashlib
import http.server
import json
import os
import random
import socket
import subprocess
import sys
import threading

import conftest
import pytest
import torch

from fusedops.makemore import cli, data


@pytest.fixture(scope="module")
def vocab(names):
    return data.Vocab(names)


def test_vocab_is_dot_then_sorted_letters(vocab):
    assert len(vocab) == 27
    assert vocab.itos == list(".abcdefghijklmnopqrstuvwxyz")
    assert vocab.stoi["."] == 0 and vocab.stoi["z"] == 26
    assert vocab.decode([5, 13, 13, 1, 0]) == "emma."


def test_splits_have_the_notebooks_sizes(names, vocab):
    random_state, first = random.getstate(), list(names[:3])
    (Xtr, Ytr), (Xval, Yval), (Xte, Yte) = data.splits(names, vocab)
    assert (len(Xtr), len(Xval), len(Xte)) == (182625, 22655, 22866)
    assert Xtr.shape == (182625, 3) and Ytr.shape == (182625,)
    assert Xtr.dtype == Ytr.dtype == torch.int64
    assert Xtr[:4].tolist() == [[0, 0, 0], [0, 0, 25], [0, 25, 21], [25, 21, 8]]  # as printed in seed 000
    assert Ytr[:4].tolist() == [25, 21, 8, 5]
    assert names[:3] == first and random.getstate() == random_state  # nothing shared is touched


def test_build_dataset_contexts():
    stoi = data.Vocab(["emma"]).stoi  # . a e m
    X, Y = data.build_dataset(["emma"], stoi, block_size=3)
    assert X.tolist() == [[0, 0, 0], [0, 0, 2], [0, 2, 3], [2, 3, 3], [3, 3, 1]]  # ... ..e .em emm mma
    assert Y.tolist() == [2, 3, 3, 1, 0]  # e m m a .


def test_character_outside_the_vocabulary(vocab):
    with pytest.raises(ValueError, match=r"'bob3'.*'3'"):
        data.build_dataset(["ann", "bob3"], vocab.stoi)
    with pytest.raises(ValueError, match=r"'Zoe'.*'Z'"):
        data.splits(["ann", "Zoe"] * 5, vocab)
    with pytest.raises(ValueError, match=r"'a\.b'"):
        data.Vocab(["a.b"])


def test_missing_or_empty_data_file(tmp_path):
    with pytest.raises(ValueError, match="nope.txt"):
        data.load_words(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        data.load_words(tmp_path / "empty.txt")


# finding and downloading the data


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves self.server.routes: path -> (body, Content-Length). A Content-Length above len(body)
    is a connection that drops before the end (HTTP/1.0: the server closes it after the body)."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path not in self.server.routes:
            return self.send_error(404)
        body, length = self.server.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(names):
    """A names file served from 127.0.0.1 in a thread: .url (its base), .text, .sha256, .requests."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.text = ("\n".join(names[:3000]) + "\n").encode()
    httpd.sha256 = hashlib.sha256(httpd.text).hexdigest()
    httpd.routes = {
        "/names.txt": (httpd.text, len(httpd.text)),
        "/copy/names.txt": (httpd.text, len(httpd.text)),
        "/dropped.txt": (httpd.text[:1000], len(httpd.text)),
    }
    httpd.requests = []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch, closed_port):
    """No test reaches the internet or the user's cache: the default URL is a closed local port, the
    cache is tmp_path/cache/fusedops, the repository root an empty folder, the working directory another."""
    monkeypatch.setattr(data, "NAMES_URL", f"http://127.0.0.1:{closed_port}/names.txt")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("repo", "cwd"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(data, "REPO_ROOT", str(tmp_path / "repo"))
    monkeypatch.chdir(tmp_path / "cwd")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache" / "fusedops"


def test_download_shows_progress_checks_sha256_and_writes_atomically(server, tmp_path, capsys):
    path = tmp_path / "out" / "names.txt"
    data.download(server.url + "/names.txt", str(path), sha256=server.sha256)
    assert path.read_bytes() == server.text
    err = capsys.readouterr().err
    assert f"downloading {server.url}/names.txt" in err and "100%" in err
    assert os.listdir(path.parent) == ["names.txt"]  # no temporary file left


@pytest.mark.parametrize(
    "route,sha256,message",
    [
        ("/names.txt", "0" * 64, "has sha256 [0-9a-f]{64}, expected 0{64}"),
        ("/dropped.txt", None, "the connection closed after 1000 of [0-9]+ bytes"),
        ("/missing.txt", None, "HTTP Error 404"),
    ],
)
def test_failed_download_leaves_no_partial_file(server, tmp_path, route, sha256, message):
    path = tmp_path / "out" / "names.txt"
    path.parent.mkdir()
    path.write_text("older\n")
    with pytest.raises(data.DataError, match="cannot download|downloaded from") as e:
        data.download(server.url + route, str(path), sha256=sha256)
    assert e.match(message) and e.match(server.url + route) and e.match("--data")
    assert path.read_text() == "older\n" and os.listdir(path.parent) == ["names.txt"]


def test_lookup_order_is_working_directory_repository_cache_download(server, tmp_path, monkeypatch, cache):
    monkeypatch.setattr(data, "NAMES_URL", server.url + "/names.txt")
    monkeypatch.setattr(data, "NAMES_SHA256", server.sha256)
    requests = len(server.requests)
    (tmp_path / "repo" / "names.txt").symlink_to(tmp_path / "nowhere.txt")  # a fresh clone's dangling link
    assert data.locate() == str(cache / "names.txt")  # downloaded
    assert (cache / "names.txt").read_bytes() == server.text and len(server.requests) == requests + 1
    assert data.locate() == str(cache / "names.txt") and len(server.requests) == requests + 1  # cached
    (tmp_path / "repo" / "names.txt").unlink()
    (tmp_path / "repo" / "names.txt").write_text("ann\n")
    assert data.locate() == str(tmp_path / "repo" / "names.txt")
    (tmp_path / "cwd" / "names.txt").write_text("bob\n")
    assert data.locate() == "names.txt"
    assert data.locate("words.txt") == "words.txt"  # a path is taken as it is
    assert len(server.requests) == requests + 1


def test_the_suite_finds_its_data_as_the_main_job_does(server, tmp_path, monkeypatch, cache):
    """A fresh clone alone: the root's names.txt a dangling link, nothing in the working directory or the cache.
    The suite's data (conftest.names_file, behind the `names` fixture) is then downloaded, as train's is."""
    monkeypatch.setattr(data, "NAMES_URL", server.url + "/names.txt")
    monkeypatch.setattr(data, "NAMES_SHA256", server.sha256)
    (tmp_path / "repo" / "names.txt").symlink_to(tmp_path / "nowhere.txt")
    path = conftest.names_file()
    assert path == str(cache / "names.txt") and data.load_words(path) == server.text.decode().split()
    assert server.requests[-1] == "/names.txt"


def test_only_the_default_url_is_checked_against_its_sha256(server, monkeypatch, cache):
    monkeypatch.setattr(data, "NAMES_URL", server.url + "/names.txt")
    monkeypatch.setattr(data, "NAMES_SHA256", "0" * 64)
    with pytest.raises(data.DataError, match="sha256"):
        data.locate()
    assert not cache.exists() or os.listdir(cache) == []
    url = server.url + "/copy/names.txt"  # the same file at another URL: the user's, not checked
    path = data.locate(url, progress=False)
    assert os.path.dirname(path) == str(cache) and path.endswith("-names.txt")
    assert open(path, "rb").read() == server.text
    assert data.locate(url) == path and server.requests.count("/copy/names.txt") == 1  # downloaded once


def test_unreachable_default_url_is_one_line_naming_it_and_data(capsys):
    assert cli.main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and data.NAMES_URL in err and "--data" in err
    assert "Connection refused" in err


def run_cli(*args, cwd, cache):
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "fusedops", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_train_on_a_url(server, tmp_path):
    url = server.url + "/names.txt"
    out = run_cli(
        "train",
        "--data",
        url,
        "--steps",
        "20",
        "--out",
        "run",
        "--quiet",
        cwd=tmp_path / "cwd",
        cache=tmp_path / "cache",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "cwd" / "run" / "run.json").read_text())
    assert report["data"] == url and report["data_file"] == data.cache_path(url)
    assert open(report["data_file"], "rb").read() == server.text
    assert len(report["runs"]["fusedops"]["losses"]) == 20


def test_unreachable_url_is_one_line_naming_it_and_data(tmp_path, closed_port):
    url = f"http://127.0.0.1:{closed_port}/names.txt"
    out = run_cli("train", "--data", url, "--steps", "1", cwd=tmp_path / "cwd", cache=tmp_path / "cache")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and url in out.stderr and "--data" in out.stderr
    assert out.stderr.startswith("python -m fusedops train: error: cannot download")
