r"""
---
title: Text to train on, offline
summary: A byte-level corpus shipped with the package (the docstrings of Python's standard library), an optional Tiny Shakespeare download, a documented split, and seeded batches.
---

# Text to train on, offline

The [training loop](train.html) needs text, and it must work on a machine with no
network (a CI runner, a laptop on a plane) as well as on Colab. So the default corpus
ships *inside the package*, and a download is only ever an option.

## The corpus: the docstrings of Python's standard library

`sophia/experiments/corpora/stdlib_docstrings.txt.gz` holds the docstrings (module, class, function
and method) of a fixed list of modules of Python's standard library, `STDLIB_MODULES`,
in that order, each under its qualified name. It was extracted from the sources of
CPython 3.11.7 by `build_stdlib_corpus()` below, which parses the files with `ast` and
imports nothing; `python -m sophia.experiments.data --build FILE` runs it again. It is about
0.9 MB of English prose and code examples (about 250 KB compressed).

**Why this text.** It is text we may redistribute: the standard library is
distributed under the [PSF License Agreement](https://docs.python.org/3/license.html),
which allows derivative works provided the licence and PSF's copyright notice are kept
with them; they are, in `sophia/experiments/corpora/PYTHON-LICENSE.txt` (Python's `LICENSE.txt`,
verbatim) and `sophia/experiments/corpora/README.md`. Modules whose files carry a licence of their own
(e.g. `tarfile`, `logging`, `re`) are left out of the list.

**Why a fixed snapshot, not built at first use.** Every Python has its standard
library, so we could extract the text on the user's machine. But docstrings change
between Python versions, and then so would every loss curve. The snapshot makes the
data, and with a seed the batches, identical on every machine; `load_corpus` checks
its SHA-256 before using it.

**Tokens.** Bytes: the vocabulary is the 256 byte values, so any text is a sequence of
tokens with no tokenizer and no unknown symbol, and the [model](model.html)'s
`vocab_size` is 256 for every corpus.

## The split

The first `TRAIN_FRACTION` of the bytes is the training split, the rest the validation
split. A contiguous split, not a random one: nearby text is similar, and a validation
set interleaved with the training set would flatter the model.

## Batches

A batch is `batch_size` windows of `block_size + 1` consecutive tokens at offsets drawn
uniformly from the split; the input is each window but its last token, the target each
window but its first. The offsets come from a `torch.Generator` the caller owns, so
the same seed gives the same batches in the same order, whichever optimizer consumes
them.

## Tiny Shakespeare (optional, needs the network once)

`load_corpus("shakespeare")` downloads Karpathy's Tiny Shakespeare (1.1 MB of plays,
public domain) with `urllib` on first use and caches it, by default under
`~/.cache/sophia/`. When the download fails the error says so and points to the
offline default; nothing else in the package touches the network.
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
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_FILE = "tinyshakespeare.txt"


# ## When there is no data
#
# Every way a corpus can fail to load (no network, a damaged snapshot, an unreadable
# file) ends in this one exception, whose message says what happened and what to do
# instead. The [command line](train.html) catches it and prints that one line, with no
# traceback: the reader of the error is a person who typed a command, not a debugger.
class DataUnavailableError(RuntimeError):
    r"""A corpus could not be loaded (a failed download, a damaged file); the message says what to do."""


# ## The modules
#
# Well-documented modules of the standard library, in a fixed order, as paths
# relative to the standard library's directory without `.py`. Every one is distributed
# under the PSF licence alone (some say "Licensed to PSF under a Contributor
# Agreement"): files whose header grants a licence of their own are not in the list.
#
# The list is written as one string split on spaces, so that it reads as a paragraph.
# Packages are named by their `__init__` file (`json/__init__`); `_pydecimal` is the
# pure-Python `decimal`: `decimal.py` itself only imports the C implementation, and
# has no docstring of its own to parse.
STDLIB_MODULES = (
    "abc argparse ast base64 bisect calendar cmd code collections/__init__ colorsys "
    "concurrent/futures/_base configparser contextlib copy csv dataclasses datetime _pydecimal difflib "
    "dis doctest email/message email/utils email/_header_value_parser enum filecmp fileinput fnmatch "
    "fractions ftplib functools getopt gettext glob graphlib gzip hashlib heapq hmac html/__init__ "
    "html/parser http/client http/server imaplib importlib/__init__ inspect ipaddress json/__init__ "
    "json/decoder json/encoder locale lzma mailbox mimetypes modulefinder netrc numbers operator os "
    "pathlib pdb pickle pickletools pkgutil poplib pprint queue quopri random reprlib rlcompleter runpy "
    "sched secrets selectors shlex shutil signal smtplib socket statistics string subprocess sysconfig "
    "tabnanny textwrap threading timeit token tokenize traceback types typing unittest/case "
    "unittest/mock urllib/parse urllib/request uuid warnings weakref zipfile zipimport"
).split()


# ## Building the snapshot
#
# Each module contributes its docstrings in source order, depth first (the module's,
# then each class's followed by its methods', then each function's), every one under
# a heading with its qualified name, e.g. `json.JSONDecoder.decode`. Docstrings are
# cleaned as `inspect.cleandoc` does (common indentation removed). The files are parsed,
# never imported: importing `antigravity` opens a web browser, and any import can run code.
# A module missing from this Python (the list is for 3.11; later versions removed or
# moved a few) is skipped and reported.
#
# `_docstrings` walks one node (a module, a class or a function) and returns its
# `(qualified name, docstring)` pairs, its own first. Only definitions directly in a
# body are visited, so a function defined inside an `if` block (a platform-dependent
# variant) is not; every definition that is visited is searched recursively, so
# methods and nested functions are.
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
    r"""Extract the docstrings of `STDLIB_MODULES` from the standard library at `stdlib_dir`
    (default: this Python's). Returns the UTF-8 text and the list of modules not found."""
    # `sysconfig` knows where this interpreter's pure-Python standard library lives,
    # in a virtual environment too (it points to the base installation).
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
        # Python source is UTF-8 unless it declares otherwise (PEP 3120), and none of
        # these files does (in 3.11); the encoding is given so that the locale of the
        # machine cannot change how they are read.
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        # Each docstring under its name, underlined with dashes as in
        # reStructuredText, then a blank line: the model sees documents with headings.
        for qualname, doc in _docstrings(tree, name):
            parts.append(f"{qualname}\n{'-' * len(qualname)}\n{doc}\n\n")
    # The text becomes bytes here, and bytes are the tokens.
    return "".join(parts).encode("utf-8"), missing


# Written with `mtime=0`, so that the same text always gives the same file, byte for byte.
# A gzip header records the modification time and the original file name; `GzipFile`
# over an already open file object, with an empty `filename` and a zero time, leaves
# both out. The highest compression level keeps the package small: the file is
# written once and read many times.
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
    r"""A byte-level corpus split into `train` and `val`, two 1-D `uint8` tensors of token ids."""

    # `name` is what runs and tables call the corpus; `train` and `val` its two splits,
    # `(N,)` tensors of byte values; `source` says where the bytes came from (a path, a
    # URL, a licence), for the record of a run.
    name: str
    train: Tensor
    val: Tensor
    source: str

    # Every byte value is a token, whether or not it occurs in the text, so the
    # vocabulary is the same for every corpus and a model trained on one can be
    # evaluated on another.
    vocab_size: int = VOCAB_SIZE

    @classmethod
    def from_bytes(cls, name: str, data: bytes, source: str = "") -> Corpus:
        r"""Split `data` into the first `TRAIN_FRACTION` (training) and the rest (validation)."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(
                f"corpus {name!r}: data must be bytes, got {type(data).__name__}"
            )
        # The bytes as a `(N,)` tensor of token ids, one per byte, with no decoding.
        # `torch.frombuffer` shares the buffer's memory instead of copying it, and warns
        # when the buffer is read-only, as `bytes` are: so it gets a `bytearray` copy,
        # which the tensor then owns. It refuses an empty buffer, hence the other branch.
        tokens = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.zeros(0, dtype=torch.uint8)
        )
        # $\lfloor N \cdot$ `TRAIN_FRACTION` $\rfloor$ tokens for training, the rest for
        # validation. The two slices are views of the one tensor, not copies.
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

    # A split must hold at least one window of `block_size + 1` tokens (an input and
    # its targets shifted by one), or there is no batch to draw. Both splits are
    # checked, because the training loop draws from both, and the validation split,
    # the smaller, is usually the one that falls short. The message gives the sizes,
    # so the reader can see whether the corpus or the context is at fault.
    def check_fits(self, block_size: int) -> None:
        r"""Raise `ValueError` unless both splits hold at least `block_size + 1` tokens."""
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
                    f"corpus {self.name!r} is too small: its {split} split has {n} tokens, fewer than "
                    f"block_size + 1 = {block_size + 1} needed for one sequence ({len(self)} tokens in all, "
                    f"{TRAIN_FRACTION:.0%} for training)"
                )

    # ### Drawing a batch
    #
    # Offsets $i_1..i_B$ uniform in $[0, N - T)$ for a split of $N$ tokens and windows
    # of $T$ = `block_size`; row $b$ of the input is tokens $i_b .. i_b + T - 1$ and row
    # $b$ of the target is tokens $i_b + 1 .. i_b + T$, so the target at every position
    # is the next token. Both are `(B, T)` `int64` tensors on `device`.
    #
    # The windows are drawn with replacement and may overlap: there are no epochs,
    # every batch is a fresh sample from the same distribution over windows. That
    # is what the analysis of a stochastic optimizer assumes, and it is what makes
    # the refresh batches of Sophia "fresh": the [training loop](train.html) draws
    # them with this same function from a generator of their own, so they are
    # independent of the training batches without being a different kind of data.
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
        r"""Inputs and next-token targets, each `(batch_size, block_size)`, from windows at random offsets."""
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.check_fits(block_size)
        data = self.split(split)
        # The offsets, `(B,)`, from the caller's generator (on the CPU, where the data is).
        offsets = torch.randint(
            len(data) - block_size, (batch_size,), generator=generator
        )
        # The windows, `(B, T + 1)`: each offset plus $0..T$. The index is a `(B, 1)`
        # column plus a `(T + 1,)` row, which broadcast to a `(B, T + 1)` table of
        # positions, and indexing the split with it gathers all the windows in one
        # operation. `long()` because the embedding and the cross-entropy want `int64`.
        windows = data[offsets[:, None] + torch.arange(block_size + 1)].long()
        # Inputs `(B, T)`, the window without its last token; targets `(B, T)`, the
        # window without its first, so `y[b, t]` is the token that follows `x[b, t]`.
        x, y = windows[:, :-1], windows[:, 1:]
        # The gathering happens on the CPU, where the corpus is; only the two small
        # batches travel to the device.
        return x.to(device), y.to(device)

    # Tokens are bytes, so decoding is `bytes(...)` and UTF-8. A sequence a model
    # writes (or a window that starts inside a multi-byte character) need not be
    # valid UTF-8, and a sample should still print: invalid bytes become U+FFFD.
    def decode(self, tokens: Tensor | list[int]) -> str:
        r"""Tokens back to text (invalid UTF-8 sequences are replaced)."""
        if isinstance(tokens, Tensor):
            tokens = tokens.tolist()
        return bytes(tokens).decode("utf-8", errors="replace")


# ## Loading
#
# The shipped snapshot, decompressed and checked against its SHA-256: a damaged or
# edited file would silently change every result.
#
# A missing file is an `OSError`; a file that is not gzip is a `gzip.BadGzipFile`,
# also an `OSError`; a truncated one ends early with an `EOFError`; a damaged
# compressed body fails its inflation with a `zlib.error`. The digest is of
# the uncompressed text, so it does not depend on how the file was compressed.
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
            f"the shipped corpus {STDLIB_FILE} has SHA-256 {digest}, expected {STDLIB_SHA256}: "
            "reinstall the package"
        )
    return Corpus.from_bytes(
        "stdlib",
        data,
        source=f"{STDLIB_FILE} (docstrings of Python's standard library, PSF licence)",
    )


# The one function that touches the network. Tests replace it. The `timeout` bounds
# each blocking operation (connecting, each read), not the whole download, so a
# server that stops answering ends the wait instead of hanging the command.
def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


# The XDG base-directory convention: `$XDG_CACHE_HOME` when it is set and not empty,
# else `~/.cache`. A cache is what may be deleted at any time and fetched again.
def default_cache_dir() -> Path:
    r"""Where downloads are cached: `$XDG_CACHE_HOME/sophia`, or `~/.cache/sophia`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sophia"


# Tiny Shakespeare: read from the cache if it is there; otherwise download it, and
# write the cache atomically (a temporary file, then a rename), so that an interrupted
# download never leaves a truncated file that later runs would take for the corpus.
#
# The errors a download can raise: `urllib.error.URLError` (no network, an unknown
# host, an HTTP error status) is an `OSError`, as is a timeout; a malformed URL is a
# `ValueError`. Each becomes a `DataUnavailableError` that points to the offline
# corpus and to where the file could be put by hand.
def _load_shakespeare(cache_dir: Path | None, timeout: float) -> Corpus:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / SHAKESPEARE_FILE
    if not path.is_file():
        try:
            data = _fetch(SHAKESPEARE_URL, timeout)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise DataUnavailableError(
                f"could not download Tiny Shakespeare from {SHAKESPEARE_URL} ({error}); "
                f"use the offline corpus (--data stdlib), or put the file at {path}"
            ) from error
        # An empty answer (a proxy that swallowed the body) is not a corpus, and once
        # cached it would be read as one forever.
        if not data:
            raise DataUnavailableError(
                f"the download of Tiny Shakespeare from {SHAKESPEARE_URL} was empty"
            )
        # The temporary name carries the process id, so that two processes downloading
        # at once (two notebooks, parallel tests) never write the same temporary file;
        # whichever renames last wins, and both wrote the same bytes. `Path.replace`
        # is a rename, atomic within one filesystem: a reader sees the old state or
        # the whole file, never part of it.
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


# Any file is a corpus: it is read as bytes and never decoded, so its encoding does
# not matter, and the corpus is named after the file.
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
    r"""Load a corpus: `"stdlib"` (shipped, offline), `"shakespeare"` (downloaded once, cached
    under `cache_dir`), or the path of a text file. Raises `DataUnavailableError` if it cannot."""
    # The two named corpora first; then anything else must be an existing file. A
    # misspelt name ("shakespear") is neither, and the message lists the names.
    if name == "stdlib":
        return _load_stdlib()
    if name == "shakespeare":
        return _load_shakespeare(
            Path(cache_dir) if cache_dir is not None else None, timeout
        )
    path = Path(name)
    if not path.is_file():
        raise DataUnavailableError(
            f"unknown corpus {name!r}: expected one of {', '.join(CORPORA)}, or the path of a text file"
        )
    return _load_file(path)


# ## The command
#
# `python -m sophia.experiments.data` describes a corpus; `--build FILE` extracts the standard
# library snapshot from this Python into `FILE` (the way the shipped one was made).
def main(argv: list[str] | None = None) -> int:
    r"""Describe a corpus, or rebuild the standard-library snapshot."""
    # Two options: which corpus to describe, or where to write a new snapshot.
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
    # `--build`: extract, compress, and print the SHA-256 to paste into
    # `STDLIB_SHA256` if the snapshot is to be replaced. On a Python other than the
    # one the snapshot was made with, the digest will differ: that is the point of
    # shipping a snapshot.
    if args.build:
        data, missing = build_stdlib_corpus()
        write_gzip(args.build, data)
        print(
            f"wrote {args.build}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"
        )
        if missing:
            print(f"modules not in this Python, skipped: {', '.join(missing)}")
        return 0
    # Otherwise describe a corpus: its size, its split and its first bytes, so that a
    # user can check what a run will train on before starting one.
    try:
        corpus = load_corpus(args.data)
    except DataUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"corpus {corpus.name!r}: {len(corpus)} tokens (bytes), vocabulary {corpus.vocab_size}"
    )
    print(
        f"  train: {len(corpus.train)} tokens, val: {len(corpus.val)} tokens ({TRAIN_FRACTION:.0%} / rest)"
    )
    print(f"  source: {corpus.source}")
    print(f"  starts: {corpus.decode(corpus.train[:200])!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
