r"""
---
title: Text to train on, offline
summary: A byte-level corpus shipped with the package (the docstrings of Python's standard library), an optional Tiny Shakespeare download, a documented split, and seeded batches.
---

The [training loop](train.html) needs text, and it must work on a machine with no
network (a CI runner, a laptop on a plane) as well as on Colab, so the default corpus
ships *inside the package*, and a download is only ever an option.

**The corpus: the docstrings of Python's standard library.**
`sophia/experiments/corpora/stdlib_docstrings.txt.gz` holds the docstrings (module,
class, function, method) of a fixed list of modules, `STDLIB_MODULES`, each under its
qualified name, extracted from CPython 3.11.7 by `build_stdlib_corpus()` below
(`python -m sophia.experiments.data --build FILE` runs it again). About 0.9 MB of
English prose and code examples, 250 KB compressed.

* **We may redistribute it**: the standard library is under the
  [PSF License Agreement](https://docs.python.org/3/license.html), which allows
  derivative works that keep the licence and PSF's copyright notice; they are in
  `corpora/PYTHON-LICENSE.txt` (Python's `LICENSE.txt`, verbatim) and
  `corpora/README.md`. Modules whose files carry a licence of their own (`tarfile`,
  `logging`, `re`, ...) are left out.
* **A fixed snapshot, not built at first use**: docstrings change between Python
  versions, and then so would every loss curve. With the snapshot the data, and with
  a seed the batches, are identical on every machine; `load_corpus` checks its SHA-256.
* **Tokens are bytes**: the vocabulary is the 256 byte values, so any text is a token
  sequence with no tokenizer, and the [model](model.html)'s `vocab_size` is 256.

**The split**: the first `TRAIN_FRACTION` of the bytes for training, the rest for
validation. Contiguous, not random: nearby text is similar, and an interleaved
validation set would flatter the model.

**Tiny Shakespeare** (optional): `load_corpus("shakespeare")` downloads Karpathy's
Tiny Shakespeare (1.1 MB, public domain) with `urllib` once and caches it, by
default under `~/.cache/sophia/`; a failed download says so and points to the offline
default. Nothing else in the package touches the network.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import os
import sys
import sysconfig
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "Corpus",
    "DataUnavailableError",
    "load_corpus",
    "build_stdlib_corpus",
    "CORPORA",
    "STDLIB_MODULES",
    "TRAIN_FRACTION",
    "VOCAB_SIZE",
]

# The fraction of the bytes, from the start, that is the training split.
TRAIN_FRACTION = 0.9

# Tokens are bytes.
VOCAB_SIZE = 256

# The names `load_corpus` takes; any other name is read as the path of a text file.
CORPORA = ("stdlib", "shakespeare")

# The shipped files live next to this module, inside the installed package, so they
# are found wherever the package is installed and whatever the working directory is.
DATA_DIR = Path(__file__).resolve().parent / "corpora"
STDLIB_FILE = DATA_DIR / "stdlib_docstrings.txt.gz"

# The SHA-256 of the uncompressed snapshot, checked on every load.
STDLIB_SHA256 = "12ee9b6b0a16f131be18681bccd3d230c5b49f60393d07c1ad9e166d5793e73a"

# Tiny Shakespeare as Karpathy published it with `char-rnn`, and the name of its copy
# in the download cache.
SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
    "tinyshakespeare/input.txt"
)
SHAKESPEARE_FILE = "tinyshakespeare.txt"


# ## When there is no data
#
# Every way a corpus can fail to load ends in this one exception, whose message says
# what to do instead; the [command line](train.html) prints it with no traceback.
class DataUnavailableError(RuntimeError):
    r"""A corpus could not be loaded (a failed download, a damaged file); the message
    says what to do."""


# ## The modules
#
# Well-documented modules under the PSF licence alone, in a fixed order, as paths in
# the standard library without `.py`; packages by their `__init__`. `_pydecimal` is
# the pure-Python `decimal`: `decimal.py` only imports the C one, with no docstrings.
STDLIB_MODULES = (
    "abc argparse ast base64 bisect calendar cmd code collections/__init__ colorsys "
    "concurrent/futures/_base configparser contextlib copy csv dataclasses datetime "
    "_pydecimal difflib dis doctest email/message email/utils "
    "email/_header_value_parser enum filecmp fileinput fnmatch fractions ftplib "
    "functools getopt gettext glob graphlib gzip hashlib heapq hmac html/__init__ "
    "html/parser http/client http/server imaplib importlib/__init__ inspect ipaddress "
    "json/__init__ json/decoder json/encoder locale lzma mailbox mimetypes "
    "modulefinder netrc numbers operator os pathlib pdb pickle pickletools pkgutil "
    "poplib pprint queue quopri random reprlib rlcompleter runpy sched secrets "
    "selectors shlex shutil signal smtplib socket statistics string subprocess "
    "sysconfig tabnanny textwrap threading timeit token tokenize traceback types "
    "typing unittest/case unittest/mock urllib/parse urllib/request uuid warnings "
    "weakref zipfile zipimport"
).split()


# ## Building the snapshot
#
# Each module's docstrings in source order, depth first, each under its qualified name
# (`json.JSONDecoder.decode`), cleaned as `inspect.cleandoc` does. The files are
# parsed, never imported: any import can run code. A module missing from this Python
# (the list is for 3.11) is skipped and reported.
#
# `_docstrings` returns a node's `(qualified name, docstring)` pairs, its own first,
# then recursively those of the definitions directly in its body (not those inside
# an `if`, platform-dependent variants).
def _docstrings(node: ast.AST, qualname: str) -> list[tuple[str, str]]:
    found = []
    doc = ast.get_docstring(node, clean=True)
    if doc:
        found.append((qualname, doc))
    # Children in source order, each under its parent's name plus its own.
    for child in node.body:
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.extend(_docstrings(child, f"{qualname}.{child.name}"))
    return found


def build_stdlib_corpus(
    stdlib_dir: str | os.PathLike | None = None,
) -> tuple[bytes, list[str]]:
    r"""Extract the docstrings of `STDLIB_MODULES` from the standard library at
    `stdlib_dir` (default: this Python's). Returns the UTF-8 text and the list of
    modules not found."""
    # `sysconfig` finds the standard library, from a virtual environment too.
    root = (
        Path(stdlib_dir)
        if stdlib_dir is not None
        else Path(sysconfig.get_paths()["stdlib"])
    )
    parts, missing = [], []
    for module in STDLIB_MODULES:
        path = root / f"{module}.py"
        if not path.is_file():
            missing.append(module)
            continue
        # The dotted module name: `json/__init__` is `json`, `email/message` is
        # `email.message`.
        name = module.removesuffix("/__init__").replace("/", ".")
        # UTF-8 (PEP 3120), given so that the machine's locale cannot change it.
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        # Each docstring under its name underlined as in reStructuredText.
        for qualname, doc in _docstrings(tree, name):
            parts.append(f"{qualname}\n{'-' * len(qualname)}\n{doc}\n\n")
    # The text becomes bytes here, and bytes are the tokens.
    return "".join(parts).encode("utf-8"), missing


# The same text always gives the same file: `GzipFile` over an open file, with an
# empty `filename` and `mtime=0`, leaves the name and time out of the header.
def write_gzip(path: str | os.PathLike, data: bytes) -> None:
    r"""Write `data` gzip-compressed, reproducibly (no timestamp in the header)."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0
        ) as f,
    ):
        f.write(data)


# ## The corpus
@dataclass
class Corpus:
    r"""A byte-level corpus split into `train` and `val`, two 1-D `uint8` tensors of
    token ids."""

    # `train` and `val` are `(N,)` tensors of byte values; `source` says where the
    # bytes came from, for the record of a run.
    name: str
    train: Tensor
    val: Tensor
    source: str

    # Every byte value is a token, whether or not it occurs: one vocabulary for all.
    vocab_size: int = VOCAB_SIZE

    @classmethod
    def from_bytes(cls, name: str, data: bytes, source: str = "") -> Corpus:
        r"""Split `data` into the first `TRAIN_FRACTION` (training) and the rest
        (validation)."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(
                f"corpus {name!r}: data must be bytes, got {type(data).__name__}"
            )
        # One token per byte. `torch.frombuffer` warns on read-only `bytes`, so it gets
        # a `bytearray` copy, and refuses an empty buffer, hence the other branch.
        tokens = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.zeros(0, dtype=torch.uint8)
        )
        # $\lfloor N \cdot$ `TRAIN_FRACTION` $\rfloor$ tokens for training; two views.
        n_train = int(len(tokens) * TRAIN_FRACTION)
        return cls(
            name=name, train=tokens[:n_train], val=tokens[n_train:], source=source
        )

    # The length of a corpus is its number of tokens, both splits together.
    def __len__(self) -> int:
        return len(self.train) + len(self.val)

    # A split by name, as the command line and the training loop spell it.
    def split(self, split: str) -> Tensor:
        r"""The tokens of `"train"` or `"val"`."""
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    # Both splits must hold one window of `block_size + 1` tokens (an input and its
    # shifted targets); the message gives the sizes, to tell whether the corpus or the
    # context is at fault.
    def check_fits(self, block_size: int) -> None:
        r"""Raise `ValueError` unless both splits hold `block_size + 1` tokens."""
        if (
            isinstance(block_size, bool)
            or not isinstance(block_size, int)
            or block_size < 1
        ):
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        for split in ("train", "val"):
            n = len(self.split(split))
            if n < block_size + 1:
                raise ValueError(
                    f"corpus {self.name!r} is too small: its {split} split has {n} "
                    f"tokens, fewer than block_size + 1 = {block_size + 1} needed for "
                    f"one sequence ({len(self)} tokens in all, {TRAIN_FRACTION:.0%} "
                    "for training)"
                )

    # ### Drawing a batch
    #
    # Offsets $i_1..i_B$ uniform in $[0, N - T)$ for a split of $N$ tokens and windows
    # of $T$ = `block_size`; row $b$ of the input is tokens $i_b .. i_b + T - 1$ and row
    # $b$ of the target is tokens $i_b + 1 .. i_b + T$, so the target at every position
    # is the next token. Both are `(B, T)` `int64` tensors on `device`.
    #
    # Windows are drawn with replacement and may overlap: no epochs, every batch a fresh
    # sample, as the analysis of a stochastic optimizer assumes. The
    # [training loop](train.html) draws Sophia's refresh batches with this function
    # from a generator of their own: independent batches of the same kind of data.
    # Without a `generator` the offsets come from PyTorch's global one.
    def batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        *,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple[Tensor, Tensor]:
        r"""Inputs and next-token targets, each `(batch_size, block_size)`, from
        windows at random offsets."""
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.check_fits(block_size)
        data = self.split(split)
        # The offsets, `(B,)`, on the CPU, where the data is.
        offsets = torch.randint(
            len(data) - block_size, (batch_size,), generator=generator
        )
        # The windows, `(B, T + 1)`: a `(B, 1)` column of offsets plus a `(T + 1,)` row
        # broadcast to a table of positions, gathered in one operation; `int64` for
        # the embedding and the cross-entropy.
        windows = data[offsets[:, None] + torch.arange(block_size + 1)].long()
        # Inputs `(B, T)` without the last token, targets without the first: `y[b, t]`
        # is the token that follows `x[b, t]`.
        x, y = windows[:, :-1], windows[:, 1:]
        # Only the two small batches travel to the device.
        return x.to(device), y.to(device)

    # A sequence a model writes (or a window cut inside a character) need not be valid
    # UTF-8, and should still print: invalid bytes become U+FFFD.
    def decode(self, tokens: Tensor | list[int]) -> str:
        r"""Tokens back to text (invalid UTF-8 sequences are replaced)."""
        if isinstance(tokens, Tensor):
            tokens = tokens.tolist()
        return bytes(tokens).decode("utf-8", errors="replace")


# ## Loading
#
# The shipped snapshot, checked against the SHA-256 of its uncompressed text: a damaged
# or edited file would silently change every result. A missing or non-gzip file is an
# `OSError`, a truncated one an `EOFError`, a damaged body a `zlib.error`.
def _load_stdlib() -> Corpus:
    try:
        data = gzip.decompress(STDLIB_FILE.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise DataUnavailableError(
            f"cannot read the shipped corpus {STDLIB_FILE}: {error}"
        ) from error
    digest = hashlib.sha256(data).hexdigest()
    if digest != STDLIB_SHA256:
        raise DataUnavailableError(
            f"the shipped corpus {STDLIB_FILE} has SHA-256 {digest}, expected "
            f"{STDLIB_SHA256}: reinstall the package"
        )
    return Corpus.from_bytes(
        "stdlib",
        data,
        source=f"{STDLIB_FILE} (docstrings of Python's standard library, PSF licence)",
    )


# The one function that touches the network; tests replace it. `timeout` bounds each
# blocking operation, so a server that stops answering cannot hang the command.
def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


# The XDG convention: `$XDG_CACHE_HOME` when set and not empty, else `~/.cache`.
def default_cache_dir() -> Path:
    r"""Where downloads are cached: `$XDG_CACHE_HOME/sophia`, or `~/.cache/sophia`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sophia"


# Tiny Shakespeare from the cache, or downloaded and cached atomically (a temporary
# file, then a rename), so an interrupted download never leaves a truncated file.
# `URLError` and timeouts are `OSError`s, a malformed URL a `ValueError`; each becomes
# a `DataUnavailableError` pointing to the offline corpus and to the cache path.
def _load_shakespeare(cache_dir: Path | None, timeout: float) -> Corpus:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / SHAKESPEARE_FILE
    if not path.is_file():
        try:
            data = _fetch(SHAKESPEARE_URL, timeout)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise DataUnavailableError(
                "could not download Tiny Shakespeare from "
                f"{SHAKESPEARE_URL} ({error}); "
                f"use the offline corpus (--data stdlib), or put the file at {path}"
            ) from error
        # An empty answer (a proxy that swallowed the body) would be cached forever.
        if not data:
            raise DataUnavailableError(
                f"the download of Tiny Shakespeare from {SHAKESPEARE_URL} was empty"
            )
        # The process id keeps two concurrent downloads off each other's temporary
        # file; `Path.replace` is an atomic rename within one filesystem.
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".part{os.getpid()}")
            partial.write_bytes(data)
            partial.replace(path)
        except OSError as error:
            raise DataUnavailableError(
                f"could not write the Tiny Shakespeare cache at {path}: {error}"
            ) from error
    return Corpus.from_bytes(
        "shakespeare", path.read_bytes(), source=f"{path} (from {SHAKESPEARE_URL})"
    )


# Any file is a corpus, read as bytes (never decoded) and named after the file.
def _load_file(path: Path) -> Corpus:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataUnavailableError(
            f"cannot read the corpus file {path}: {error.strerror or error}"
        ) from error
    return Corpus.from_bytes(path.name, data, source=str(path))


def load_corpus(
    name: str = "stdlib",
    *,
    cache_dir: str | os.PathLike | None = None,
    timeout: float = 30.0,
) -> Corpus:
    r"""Load a corpus: `"stdlib"` (shipped, offline), `"shakespeare"` (downloaded
    once, cached under `cache_dir`), or the path of a text file. Raises
    `DataUnavailableError` if it cannot."""
    # A misspelt name ("shakespear") is not a file either, and the message lists the
    # names.
    if name == "stdlib":
        return _load_stdlib()
    if name == "shakespeare":
        return _load_shakespeare(
            Path(cache_dir) if cache_dir is not None else None, timeout
        )
    path = Path(name)
    if not path.is_file():
        raise DataUnavailableError(
            f"unknown corpus {name!r}: expected one of {', '.join(CORPORA)}, or the "
            "path of a text file"
        )
    return _load_file(path)


# ## The command
#
# `python -m sophia.experiments.data` describes a corpus; `--build FILE` extracts the
# standard-library snapshot from this Python into `FILE`, as the shipped one was made.
def main(argv: list[str] | None = None) -> int:
    r"""Describe a corpus, or rebuild the standard-library snapshot."""
    parser = argparse.ArgumentParser(
        prog="python -m sophia.experiments.data",
        description="Describe or build a training corpus.",
    )
    parser.add_argument(
        "--data", default="stdlib", help="stdlib, shakespeare, or a text file"
    )
    parser.add_argument(
        "--build",
        metavar="FILE",
        help="extract the stdlib docstrings of this Python into FILE (.txt.gz)",
    )
    args = parser.parse_args(argv)
    # The SHA-256 to paste into `STDLIB_SHA256` if the snapshot is replaced; on another
    # Python it differs, which is the point of shipping a snapshot.
    if args.build:
        data, missing = build_stdlib_corpus()
        write_gzip(args.build, data)
        digest = hashlib.sha256(data).hexdigest()
        print(f"wrote {args.build}: {len(data)} bytes, sha256 {digest}")
        if missing:
            print(f"modules not in this Python, skipped: {', '.join(missing)}")
        return 0
    # Otherwise its size, split and first bytes: what a run would train on.
    try:
        corpus = load_corpus(args.data)
    except DataUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"corpus {corpus.name!r}: {len(corpus)} tokens (bytes), vocabulary "
        f"{corpus.vocab_size}"
    )
    print(
        f"  train: {len(corpus.train)} tokens, val: {len(corpus.val)} tokens "
        f"({TRAIN_FRACTION:.0%} / rest)"
    )
    print(f"  source: {corpus.source}")
    print(f"  starts: {corpus.decode(corpus.train[:200])!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
