"""The makemore data: names, one per line, turned into (3 previous characters -> next character);
found on disk, or downloaded once into a cache."""

import hashlib
import http.client
import os
import random
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import torch

NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"  # of the file at NAMES_URL
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class DataError(ValueError):
    """The data file is missing, empty or cannot be downloaded, or a word holds a character outside
    the vocabulary."""


def cache_dir():
    """$XDG_CACHE_HOME/fusedops, else ~/.cache/fusedops."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fusedops")


def cache_path(url):
    """Where the download of `url` is kept: names.txt for NAMES_URL; for any other URL its file name
    after a hash of the URL, so that two URLs never share a file."""
    if url == NAMES_URL:
        return os.path.join(cache_dir(), "names.txt")
    name = os.path.basename(urllib.parse.urlsplit(url).path) or "data.txt"
    return os.path.join(cache_dir(), f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}")


def locate(source=None, progress=True):
    """A local path to the data. `source`: a path (returned as it is), an http(s) URL (its copy in the
    cache, downloaded on first use) or None: names.txt in the working directory, else at the
    repository's root, else in the cache, else downloaded from NAMES_URL into the cache."""
    if source is None:
        for path in ("names.txt", os.path.join(REPO_ROOT, "names.txt")):
            if os.path.isfile(path):  # False for a dangling link too
                return path
        source = NAMES_URL
    if urllib.parse.urlsplit(source).scheme.lower() not in ("http", "https"):
        return source
    path = cache_path(source)
    if not os.path.isfile(path):
        download(source, path, sha256=NAMES_SHA256 if source == NAMES_URL else None, progress=progress)
    return path


def download(url, path, sha256=None, progress=True):
    """Writes what `url` serves to `path`, with a progress bar on stderr. The bytes go to a temporary
    file beside `path`, renamed onto it (os.replace: atomic) only once they are complete and, given
    `sha256`, once their digest matches: `path` never holds a partial file."""
    from tqdm import tqdm

    hint = "pass another path or http(s) URL with --data"
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=30) as response:
            size, digest = response.length, hashlib.sha256()  # length: the Content-Length, or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {url}", disable=not progress) as bar:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if size is not None and f.tell() != size:
                raise DataError(
                    f"cannot download {url}: the connection closed after {f.tell()} of {size} bytes; {hint}"
                )
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DataError(
                f"the file downloaded from {url} has sha256 {digest.hexdigest()}, expected {sha256}; {hint}"
            )
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:  # urllib.error.URLError is an OSError
        reason = (
            e
            if isinstance(e, urllib.error.HTTPError)
            else getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        )
        raise DataError(f"cannot download {url}: {reason}; {hint}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def load_words(path):
    """The words in `path`, one per line (blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            words = [w for w in f.read().splitlines() if w]
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise DataError(f"cannot read the data file {str(path)!r}: {reason}") from None
    if not words:
        raise DataError(f"the data file {str(path)!r} holds no words")
    return words


class Vocab:
    """'.' (start and end of a word) is 0, then the data's characters in sorted order: 1, 2, ..."""

    def __init__(self, words):
        for w in words:
            if "." in w:
                raise DataError(f"word {w!r} contains '.', which marks the start and end of a word")
        chars = sorted(set("".join(words)))
        self.itos = ["."] + chars
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    def __len__(self):
        return len(self.itos)

    def decode(self, ixs):
        return "".join(self.itos[i] for i in ixs)


def build_dataset(words, stoi, block_size=3):
    """X[i] is a context of `block_size` character indices, Y[i] the index of the one after it."""
    X, Y = [], []
    for w in words:
        context = [0] * block_size  # '...' before the first character
        for ch in w + ".":
            if ch not in stoi:
                raise DataError(f"word {w!r} contains {ch!r}, which is not in the vocabulary")
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]  # crop and append
    return torch.tensor(X, dtype=torch.int64).view(-1, block_size), torch.tensor(Y, dtype=torch.int64)


def splits(words, vocab=None, block_size=3, seed=42):
    """The notebooks' split: shuffle with random.seed(42), then 80% train, 10% val, 10% test.

    Returns ((Xtr, Ytr), (Xval, Yval), (Xte, Yte)). `words` is left as it is, and so is the global
    random state (a private random.Random(seed) shuffles exactly as random.seed(seed) would).
    """
    stoi = (Vocab(words) if vocab is None else vocab).stoi
    words = list(words)
    random.Random(seed).shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return tuple(build_dataset(part, stoi, block_size) for part in (words[:n1], words[n1:n2], words[n2:]))
