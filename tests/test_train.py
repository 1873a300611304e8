r"""The training loop and its command line: losses fall, runs repeat, implementations agree, bad input
is refused in one line, labml stays inside --out, and compare writes its figure and tables."""

import csv
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt_args, tiny_train_config

import sophia
import sophia.experiments.cli as cli_module
import sophia.experiments.compare as compare_module
from sophia.experiments.cli import main
from sophia.experiments.compare import compare, steps_to_reach, summarize
from sophia.experiments.config import TrainConfig, lr_at
from sophia.experiments.data import Corpus, load_corpus
from sophia.experiments.train import RunResult, train

TINY = tiny_train_config(batch_size=8, steps=30, eval_interval=10, eval_iters=2)
TINY_ARGS = [*tiny_gpt_args(), "--eval-interval", "2"]
PACKAGE_DIR = Path(sophia.__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("stdlib")


def run(corpus, **changes) -> RunResult:
    return train(dataclasses.replace(TINY, **changes), corpus=corpus)


# ## The loop


@pytest.mark.parametrize("optimizer", ["adamw", "sophiag", "sophiah"])
def test_a_few_steps_lower_the_loss(corpus, optimizer):
    result = run(corpus, optimizer=optimizer)
    assert result.val_losses[0] == pytest.approx(math.log(256), abs=0.15)
    assert result.final_val_loss < result.val_losses[0] - 1.0
    assert sum(result.train_losses[-5:]) < sum(result.train_losses[:5]) - 5 * 1.0
    assert result.eval_steps == [0, 10, 20, 30]
    assert len(result.train_losses) == 30 and result.wall_seconds > 0
    if optimizer == "adamw":
        assert result.refresh_steps == [] and result.hessian_seconds == 0
    else:
        # A refresh after steps 10, 20, 30, each followed by a win rate.
        assert result.refresh_steps == [10, 20, 30]
        assert len(result.win_rates) == 3 and all(0 <= w <= 1 for w in result.win_rates)
        assert 0 < result.hessian_seconds < result.wall_seconds


def test_same_seed_gives_identical_losses(corpus):
    a = run(corpus, optimizer="sophiag", steps=12, seed=3)
    b = run(corpus, optimizer="sophiag", steps=12, seed=3)
    c = run(corpus, optimizer="sophiag", steps=12, seed=4)
    assert (
        a.train_losses == b.train_losses
        and a.val_losses == b.val_losses
        and a.win_rates == b.win_rates
    )
    assert a.train_losses != c.train_losses


def test_every_optimizer_sees_the_same_batches(corpus, monkeypatch):
    seen = []
    real_batch = Corpus.batch

    def spy(self, split, *args, **kwargs):
        x, y = real_batch(self, split, *args, **kwargs)
        if split == "train":
            seen[-1].append(x.clone())
        return x, y

    monkeypatch.setattr(Corpus, "batch", spy)
    losses = {}
    for optimizer in ("adamw", "sophiag"):
        seen.append([])
        losses[optimizer] = run(
            corpus, optimizer=optimizer, steps=12, seed=1, hess_interval=5
        )
    adamw, sophiag = seen
    # Sophia-G draws a refresh batch after every fifth step; the others are the
    # training batches, the same as AdamW's, in the same order.
    training = [x for i, x in enumerate(sophiag) if i % 6 != 5]
    assert len(adamw) == len(training) == 12
    assert all(torch.equal(a, b) for a, b in zip(adamw, training))
    # Same initial weights, same first batch: the same loss before the first update.
    assert losses["adamw"].train_losses[0] == losses["sophiag"].train_losses[0]
    assert losses["adamw"].val_losses[0] == losses["sophiag"].val_losses[0]


@pytest.mark.parametrize("optimizer", ["sophiag", "sophiah"])
def test_reference_and_foreach_give_bitwise_equal_losses(corpus, optimizer):
    ref = run(corpus, optimizer=optimizer, impl="reference", steps=20, hess_interval=5)
    fe = run(corpus, optimizer=optimizer, impl="foreach", steps=20, hess_interval=5)
    assert ref.train_losses == fe.train_losses
    assert ref.val_losses == fe.val_losses
    assert ref.win_rates == fe.win_rates


@pytest.mark.slow
def test_fused_follows_the_reference(corpus):
    fused = pytest.importorskip("sophia.fused")
    try:
        fused.load_extension("cpu")
    except Exception as error:
        pytest.skip(f"the CPU build of the fused kernel is unavailable: {error}")
    ref = run(corpus, optimizer="sophiag", impl="reference", steps=20, hess_interval=5)
    fu = run(corpus, optimizer="sophiag", impl="fused", steps=20, hess_interval=5)
    torch.testing.assert_close(
        torch.tensor(fu.train_losses), torch.tensor(ref.train_losses), rtol=1e-4, atol=0
    )


# ## The sign-momentum baseline


def test_sign_momentum_is_sophiag_that_never_refreshes(corpus, monkeypatch):
    import sophia.experiments.train as train_module
    from sophia.optimizer import SophiaG

    made = []
    real_make = train_module.make_optimizer

    def keep(model, config):
        made.append(real_make(model, config))
        return made[-1]

    monkeypatch.setattr(train_module, "make_optimizer", keep)
    sign = run(corpus, optimizer="signmomentum", steps=12, hess_interval=5)
    sophia = run(corpus, optimizer="sophiag", steps=12, hess_interval=1000)
    assert type(made[0]) is SophiaG
    assert sign.config["lr"] == sophia.config["lr"]
    # $h$ stays zero: every step was the sign of the momentum, and no refresh ran.
    hessians = [s["hessian"] for s in made[0].state.values()]
    assert hessians and all(torch.count_nonzero(h) == 0 for h in hessians)
    assert sign.refresh_steps == [] and sign.win_rates == []
    assert sign.hessian_seconds == 0
    # Sophia-G whose first refresh never comes takes the same steps, bit for bit.
    assert sign.train_losses == sophia.train_losses
    assert sign.val_losses == sophia.val_losses


def test_sign_momentum_never_calls_update_hessian(corpus, monkeypatch):
    from sophia.optimizer import SophiaG

    def refuse(self, *args, **kwargs):
        pytest.fail("signmomentum refreshed its Hessian")

    monkeypatch.setattr(SophiaG, "update_hessian", refuse)
    result = run(corpus, optimizer="signmomentum", steps=6, hess_interval=2)
    assert len(result.train_losses) == 6


def test_sign_momentum_takes_sophiag_defaults():
    from sophia.experiments.config import OPTIMIZER_DEFAULTS

    assert OPTIMIZER_DEFAULTS["signmomentum"] == OPTIMIZER_DEFAULTS["sophiag"]
    assert TrainConfig(optimizer="signmomentum").hyper() == TrainConfig().hyper()


def test_an_unknown_optimizer_lists_the_valid_names(corpus, tmp_path, capsys):
    names = "adamw, sophiag, sophiah, signmomentum"
    with pytest.raises(
        ValueError, match=f"optimizer must be one of {names}, got 'sgd'"
    ):
        compare(TINY, ["adamw", "sgd"], [0], corpus=corpus)
    with pytest.raises(ValueError, match=f"optimizer must be one of {names}"):
        TrainConfig(optimizer="signmoment")
    args = ["compare", "--optimizers", "signmoment", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit:
        main([*args, *TINY_ARGS])
    assert exit.value.code == 2
    assert_one_line_error(
        capsys.readouterr().err, "invalid choice: 'signmoment' (choose from"
    )


# ## Wall-clock, interleaved


def test_timed_seconds_rebuild_the_clock_from_the_medians():
    from sophia.experiments.compare import timed_seconds

    result = RunResult(
        optimizer="sophiag",
        impl="default",
        seed=0,
        steps=20,
        n_params=1,
        tokens_per_step=1,
        eval_steps=[0, 10, 20],
        eval_seconds=[0.0, 9.0, 99.0],
        refresh_steps=[5, 10, 15, 20],
    )
    # Without an interleaved timing, the run's own clock.
    assert timed_seconds(result) == [0.0, 9.0, 99.0]
    result.step_ms, result.refresh_ms = 100.0, 1000.0
    # 10 steps and 2 refreshes, then 20 steps and 4 refreshes.
    assert timed_seconds(result) == pytest.approx([0.0, 3.0, 6.0])


def test_compare_times_every_optimizer_interleaved(corpus):
    results = compare(
        dataclasses.replace(TINY, steps=4, hess_interval=2, eval_interval=2),
        ["adamw", "sophiag", "signmomentum"],
        [0, 1],
        corpus=corpus,
        timing_repeats=2,
    )
    for r in results:
        assert r.step_ms > 0
        assert (r.refresh_ms is not None) == (r.optimizer == "sophiag")
        assert r.refresh_ms is None or r.refresh_ms > 0
    # One timing per optimizer, shared by its seeds.
    assert results[0].step_ms == results[1].step_ms
    rows = summarize(results)
    assert all(r["timed_ms_per_step"] >= r["step_ms"] for r in rows)
    table = compare_module.markdown_table(rows)
    assert "measured one run after another on this machine, so load-dependent" in table
    assert "| signmomentum |" in table
    untimed = compare(
        dataclasses.replace(TINY, steps=2, eval_interval=1),
        ["adamw"],
        [0],
        corpus=corpus,
        timing_repeats=0,
    )
    assert untimed[0].step_ms is None
    with pytest.raises(ValueError, match="timing_repeats must be an int >= 0, got -1"):
        compare(TINY, ["adamw"], [0], corpus=corpus, timing_repeats=-1)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    kw = dict(peak=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    values = [lr_at(t, **kw) for t in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    config = TrainConfig(steps=100, lr=2e-3)
    assert config.warmup == 10 and config.lr_at(9) == pytest.approx(2e-3)
    assert config.lr_at(99) == pytest.approx(2e-4, rel=0.01)


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            dict(optimizer="sgd"),
            r"optimizer must be one of adamw, sophiag, sophiah, signmomentum, got 'sgd'",
        ),
        (
            dict(impl="cuda"),
            r"impl must be one of reference, foreach, fused \(or None\), got 'cuda'",
        ),
        (dict(steps=0), r"steps must be an int >= 1, got 0"),
        (dict(seq_len=17), r"seq_len=17 is longer than the model's block_size=16"),
        (dict(lr=-1.0), r"lr must be > 0, got -1.0"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\), got 1.0"),
        (dict(device="gpu0"), r"device must be a torch device"),
    ],
)
def test_config_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **changes)


def test_steps_to_reach_interpolates_between_evaluations():
    assert steps_to_reach([0, 10, 20], [5.0, 3.0, 2.0], 2.5) == pytest.approx(15.0)
    assert steps_to_reach([0, 10, 20], [5.0, 3.0, 2.0], 6.0) == 0.0
    assert steps_to_reach([0, 10, 20], [5.0, 3.0, 2.0], 1.0) is None


# ## The command line


def cli(*args, cwd=None, env=None):
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sophia.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def assert_one_line_error(stderr, match):
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert lines and "error:" in lines[-1] and match in lines[-1], stderr


@pytest.mark.parametrize(
    "args, match",
    [
        (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (
            ["--n-embd", "100", "--n-head", "3"],
            "n_embd must be divisible by n_head, got n_embd=100 and n_head=3",
        ),
    ],
)
def test_cli_refuses_bad_input_in_one_line(tmp_path, args, match):
    result = cli("--out", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, match)


@pytest.mark.parametrize(
    "args, code, match",
    [
        (["--impl", "cuda"], 2, "invalid choice: 'cuda'"),
        (["--seq-len", "65"], 2, "seq_len=65 is longer than the model's block_size=64"),
        (["--steps", "0"], 2, "steps must be an int >= 1, got 0"),
        (["--data", "{tiny}"], 2, "is too small: its train split has 8 tokens"),
        (["--data", "{missing}"], 1, "unknown corpus"),
        (["--out", "{file}"], 2, "exists and is not a directory"),
        (["--out", "{file}/sub"], 2, "cannot create output directory"),
    ],
)
def test_cli_bad_input_messages_and_exit_codes(tmp_path, capsys, args, code, match):
    (tmp_path / "tiny.txt").write_text("too short")
    (tmp_path / "file").write_text("")
    paths = dict(
        tiny=tmp_path / "tiny.txt",
        missing=tmp_path / "missing.txt",
        file=tmp_path / "file",
    )
    args = [a.format(**paths) for a in args]
    argv = args if "--out" in args else ["--out", str(tmp_path / "out"), *args]
    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    assert status == code
    assert_one_line_error(capsys.readouterr().err, match)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere"
)
def test_cli_refuses_an_unwritable_output_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["--out", str(locked), *TINY_ARGS]) == 2
        assert_one_line_error(capsys.readouterr().err, "is not writable")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    "lr, match",
    [
        ("sgd=1e-3", "--lr takes OPTIMIZER=LR"),
        ("adamw=fast", "'fast' is not a number"),
        ("adamw=-1", "--lr adamw must be > 0"),
        ("sophiah=1e-3", "sophiah is not among --optimizers"),
    ],
)
def test_compare_refuses_bad_learning_rates(tmp_path, capsys, lr, match):
    args = [
        "compare",
        "--optimizers",
        "adamw",
        "sophiag",
        "--lr",
        lr,
        "--out",
        str(tmp_path),
        *TINY_ARGS,
    ]
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr().err, match)


def test_a_missing_optional_package_is_named_before_training(
    tmp_path, capsys, monkeypatch
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    monkeypatch.setattr(
        cli_module, "compare", lambda *a, **k: pytest.fail("trained before checking")
    )
    assert main(["compare", "--out", str(tmp_path), *TINY_ARGS]) == 1
    assert_one_line_error(
        capsys.readouterr().err, "the figure of compare needs the matplotlib package"
    )


def test_compare_refuses_repeated_seeds(tmp_path, capsys):
    assert (
        main(["compare", "--seeds", "1", "1", "--out", str(tmp_path), *TINY_ARGS]) == 2
    )
    assert_one_line_error(capsys.readouterr().err, "--seeds must be distinct")


def snapshot(root: Path) -> dict[str, float]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if "__pycache__" not in p.parts
    }


def test_labml_writes_only_under_out(tmp_path):
    pytest.importorskip("labml")
    cwd, home, out = tmp_path / "cwd", tmp_path / "home", tmp_path / "runs" / "one"
    cwd.mkdir()
    home.mkdir()
    package_before = snapshot(PACKAGE_DIR)
    env = {
        **os.environ,
        "HOME": str(home),
        "PYTHONDONTWRITEBYTECODE": "1",
        "labml_app_url": "",
    }
    result = cli(
        "--optimizer",
        "sophiag",
        "--steps",
        "4",
        "--hess-interval",
        "2",
        "--out",
        str(out),
        *TINY_ARGS,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert list(cwd.iterdir()) == [], "labml wrote into the working directory"
    assert list(home.iterdir()) == [], "labml wrote into the home directory"
    assert snapshot(PACKAGE_DIR) == package_before, (
        "something was written into the package"
    )
    runs = list((out / "logs" / "sophiag-seed0").iterdir())
    assert len(runs) == 1 and (runs[0] / "run.yaml").is_file()
    assert (out / "sophiag-seed0.json").is_file()


def test_compare_writes_the_figure_and_tables(tmp_path, capsys):
    pytest.importorskip("labml")
    pytest.importorskip("matplotlib")
    out = tmp_path / "compare"
    assert (
        main(
            [
                "compare",
                "--steps",
                "4",
                "--hess-interval",
                "2",
                "--seeds",
                "0",
                "1",
                "--out",
                str(out),
                *TINY_ARGS,
            ]
        )
        == 0
    )
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == compare_module.CSV_COLUMNS
    assert [r["optimizer"] for r in rows] == ["adamw", "sophiag", "sophiah"]
    assert all(r["seeds"] == "2" and r["baseline"] == "adamw" for r in rows)
    assert rows[0]["hessian_overhead_pct"] == "0.0" and rows[0]["win_rate_mean"] == ""
    assert (
        float(rows[1]["hessian_overhead_pct"]) > 0
        and 0 <= float(rows[1]["win_rate_mean"]) <= 1
    )
    table = (out / "compare.md").read_text()
    assert "| " + " | ".join(compare_module.MARKDOWN_HEADER) + " |" in table
    for name in ("adamw", "sophiag", "sophiah"):
        assert f"| {name} |" in table
    assert "| adamw |" in capsys.readouterr().out


def test_summary_compares_with_the_baseline(corpus):
    results = compare(
        dataclasses.replace(TINY, steps=10, eval_interval=5),
        ["adamw", "sophiag"],
        [0],
        corpus=corpus,
        overrides={"adamw": {"lr": 3e-3}},
    )
    assert results[0].config["lr"] == 3e-3 and results[1].config["lr"] == TINY.lr
    rows = summarize(results)
    assert [r["optimizer"] for r in rows] == ["adamw", "sophiag"]
    adamw, sophiag = rows
    assert adamw["target_val_loss"] == results[0].final_val_loss
    assert adamw["steps_to_target"] is not None and adamw["steps_to_target"] <= 10
    assert adamw["steps_ratio"] == pytest.approx(1.0)
    assert adamw["baseline_steps_to_match"] == pytest.approx(adamw["steps_to_target"])
    assert adamw["win_rate_mean"] is None and sophiag["win_rate_mean"] is not None


# ## labml and IPython


def test_importing_the_trainer_imports_neither_labml_nor_ipython():
    code = "import sys, sophia.experiments.train; assert not {'labml', 'IPython', 'matplotlib'} & set(sys.modules), sys.modules.keys()"
    result = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_labml_notebook_output_works_with_ipython_9(tmp_path):
    pytest.importorskip("labml")
    # A stand-in for IPython 9: `display` lives in `display_functions` only.
    core = tmp_path / "IPython" / "core"
    core.mkdir(parents=True)
    (tmp_path / "IPython" / "__init__.py").write_text("")
    (core / "__init__.py").write_text("")
    (core / "display.py").write_text(
        "class HTML:\n    def __init__(self, data):\n        self.data = data\n"
    )
    (core / "display_functions.py").write_text(
        "def display(*objs, **kwargs):\n    return objs\n"
    )
    code = (
        "import IPython.core.display, sophia.experiments.tracking\n"
        "try:\n"
        "    import labml.internal.logger.destinations.ipynb\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('the stand-in is not IPython 9-like')\n"
        "import sys\n"
        "for name in [m for m in sys.modules if m.startswith('labml.internal.logger.destinations.ipynb')]:\n"
        "    del sys.modules[name]\n"
        "sophia.experiments.tracking._ipython_shim()\n"
        "import labml.internal.logger.destinations.ipynb\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(tmp_path), os.environ.get("PYTHONPATH", "")]
        ),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
