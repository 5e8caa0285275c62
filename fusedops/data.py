"""The makemore data: names, one per line, turned into (3 previous characters -> next character)."""
import random

import torch


class DataError(ValueError):
    """The data file is missing or empty, or a word holds a character outside the vocabulary."""


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
