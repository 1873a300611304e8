r"""The corpus: the shipped one loads offline, the split, seeded batches, errors, the Shakespeare download (faked)."""

import gzip
import hashlib
import urllib.error

import pytest
import torch

import sophia.experiments.data as data
from sophia.experiments.data import Corpus, DataUnavailableError, load_corpus


@pytest.fixture(scope="module")
def stdlib():
    return load_corpus("stdlib")


def test_shipped_corpus_loads_offline(stdlib, monkeypatch):
    # Any attempt to reach the network fails the test.
    monkeypatch.setattr(
        data,
        "_fetch",
        lambda *a, **k: pytest.fail("the offline corpus must not download"),
    )
    corpus = load_corpus("stdlib")
    assert corpus.name == "stdlib" and corpus.vocab_size == 256
    assert len(corpus) == len(gzip.decompress(data.STDLIB_FILE.read_bytes())) > 500_000
    assert corpus.decode(corpus.train[:3]) == "abc"
    assert "PSF" in corpus.source


def test_split_is_first_ninety_percent_then_the_rest(stdlib):
    raw = gzip.decompress(data.STDLIB_FILE.read_bytes())
    n_train = int(len(raw) * data.TRAIN_FRACTION)
    assert data.TRAIN_FRACTION == 0.9
    assert len(stdlib.train) == n_train and len(stdlib.val) == len(raw) - n_train
    assert bytes(stdlib.train[-5:].tolist()) == raw[n_train - 5 : n_train]
    assert bytes(stdlib.val[:5].tolist()) == raw[n_train : n_train + 5]


def test_shipped_files_document_their_licence():
    readme = (data.DATA_DIR / "README.md").read_text()
    assert "Python Software Foundation License" in readme and "3.11.7" in readme
    assert (
        "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2"
        in (data.DATA_DIR / "PYTHON-LICENSE.txt").read_text()
    )


def test_damaged_snapshot_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "corpus.txt.gz"
    bad.write_bytes(gzip.compress(b"not the corpus"))
    monkeypatch.setattr(data, "STDLIB_FILE", bad)
    with pytest.raises(DataUnavailableError, match="SHA-256"):
        load_corpus("stdlib")


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not gzip"])
def test_unreadable_snapshot_is_a_clear_error(tmp_path, monkeypatch, damage):
    raw = bytearray(gzip.compress(b"some text " * 1000))
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "flipped":
        for i in range(20, 40):
            raw[i] ^= 0xFF
    else:
        raw = bytearray(b"plain text")
    bad = tmp_path / "corpus.txt.gz"
    bad.write_bytes(bytes(raw))
    monkeypatch.setattr(data, "STDLIB_FILE", bad)
    with pytest.raises(
        DataUnavailableError, match="cannot read the shipped corpus|SHA-256"
    ):
        load_corpus("stdlib")


def test_builder_extracts_docstrings_without_importing(tmp_path):
    (tmp_path / "abc.py").write_text(
        '"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n'
    )
    (tmp_path / "collections").mkdir()
    (tmp_path / "collections" / "__init__.py").write_text(
        'raise SystemExit("never imported")\n"""not a docstring"""\n'
    )
    text, missing = data.build_stdlib_corpus(tmp_path)
    assert (
        text.decode()
        == "abc\n---\nModule doc.\n\nabc.A\n-----\nClass doc.\n\nabc.A.f\n-------\nMethod doc.\n\n"
    )
    assert (
        "argparse" in missing
        and "abc" not in missing
        and "collections/__init__" not in missing
    )


def test_builder_on_this_python_is_deterministic(tmp_path):
    a, _ = data.build_stdlib_corpus()
    data.write_gzip(tmp_path / "a.gz", a)
    data.write_gzip(tmp_path / "b.gz", a)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    assert len(a) > 100_000


def test_batches_have_the_right_shapes_and_are_next_tokens(stdlib):
    x, y = stdlib.batch("train", 5, 32, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < 256 and int(x.min()) >= 0


def test_batches_are_deterministic_given_a_seed(stdlib):
    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return [stdlib.batch("val", 4, 16, generator=gen) for _ in range(3)]

    for (xa, ya), (xb, yb) in zip(draw(7), draw(7)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(draw(7)[0][0], draw(8)[0][0])


def test_batches_come_from_the_right_split():
    corpus = Corpus.from_bytes("ab", b"a" * 900 + b"b" * 100)
    x, _ = corpus.batch("train", 8, 10, generator=torch.Generator().manual_seed(0))
    assert (x == ord("a")).all()
    x, _ = corpus.batch("val", 8, 10, generator=torch.Generator().manual_seed(0))
    assert (x == ord("b")).all()
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        corpus.batch("test", 8, 10)


def test_corpus_smaller_than_one_sequence_is_refused():
    corpus = Corpus.from_bytes("tiny", b"x" * 300)
    corpus.check_fits(29)
    with pytest.raises(
        ValueError,
        match=r"corpus 'tiny' is too small: its val split has 30 tokens, fewer than "
        r"block_size \+ 1 = 31",
    ):
        corpus.batch("train", 2, 30)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        corpus.check_fits(0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        corpus.batch("train", 0, 8)


def test_a_text_file_is_a_corpus(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world\n" * 100)
    corpus = load_corpus(str(path))
    assert len(corpus) == 1200 and corpus.name == "notes.txt"


def test_unknown_corpus_name_is_refused():
    with pytest.raises(
        DataUnavailableError,
        match=r"unknown corpus 'nope': expected one of stdlib, shakespeare",
    ):
        load_corpus("nope")


SHAKESPEARE = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200


def test_shakespeare_downloads_once_then_uses_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(url, timeout):
        calls.append(url)
        return SHAKESPEARE

    monkeypatch.setattr(data, "_fetch", fake_fetch)
    corpus = load_corpus("shakespeare", cache_dir=tmp_path / "cache")
    assert calls == [data.SHAKESPEARE_URL]
    assert (tmp_path / "cache" / data.SHAKESPEARE_FILE).read_bytes() == SHAKESPEARE
    assert corpus.name == "shakespeare" and len(corpus) == len(SHAKESPEARE)
    assert not list((tmp_path / "cache").glob("*.part*"))
    again = load_corpus("shakespeare", cache_dir=tmp_path / "cache")
    assert calls == [data.SHAKESPEARE_URL] and torch.equal(again.train, corpus.train)


@pytest.mark.parametrize(
    "failure",
    [
        urllib.error.URLError("no route to host"),
        TimeoutError("timed out"),
        OSError("network is unreachable"),
    ],
)
def test_shakespeare_download_failure_says_what_to_do(tmp_path, monkeypatch, failure):
    def failing_fetch(url, timeout):
        raise failure

    monkeypatch.setattr(data, "_fetch", failing_fetch)
    with pytest.raises(
        DataUnavailableError,
        match=r"could not download Tiny Shakespeare .* use the offline corpus",
    ):
        load_corpus("shakespeare", cache_dir=tmp_path)
    assert not (tmp_path / data.SHAKESPEARE_FILE).exists()


def test_shipped_hash_matches_the_file():
    raw = gzip.decompress(data.STDLIB_FILE.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == data.STDLIB_SHA256
