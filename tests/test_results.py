r"""The results pages: every documented number comes from the committed data, and
the generator reads that data."""

from __future__ import annotations

import json
import shutil

import pytest

from sophia.experiments import pages, results, studies
from sophia.experiments.cli import _compare_parser


def test_the_pages_say_what_the_data_says():
    found = pages.differences()
    assert not found, "\n".join(
        [*found, "regenerate: python -m sophia.experiments.results write"]
    )


@pytest.mark.parametrize("name", list(studies.STUDIES))
def test_every_study_has_its_data_and_its_summary_matches_its_runs(name, tmp_path):
    runs = studies.load_runs(name)
    assert runs and all(r.val_losses for r in runs)
    # `compare.csv` is what `compare` writes from these very runs.
    assert studies.csv_matches(name, studies.ROOT, tmp_path / "compare.csv")


@pytest.mark.parametrize("name", list(studies.STUDIES))
def test_every_study_is_a_valid_compare_command(name):
    args = _compare_parser().parse_args([*studies.STUDIES[name], "--out", "x"])
    runs = studies.load_runs(name)
    assert sorted({r.optimizer for r in runs}) == sorted(args.optimizers)
    assert sorted({r.seed for r in runs}) == sorted(args.seeds)
    assert {r.steps for r in runs} == {args.steps}
    # The command on the page is the one that ran.
    assert studies.command(name).startswith("python -m sophia.train compare ")


def test_the_measurement_and_the_comparison_agree():
    # Two code paths, one run: the win-rate module's Sophia-G and Sophia-H at seed 0
    # and the comparison's.
    data = studies.winrate_data(studies.ROOT)
    final = {(r.optimizer, r.seed): r for r in studies.load_runs("final")}
    for name, measured in (("sophiag", data["sophiag"]), ("sophiah", data["sophiah"])):
        run = final[(name, 0)]
        assert measured["final_val_loss"] == run.final_val_loss
        assert measured["win_rate_mean"] == pytest.approx(
            sum(run.win_rates) / len(run.win_rates), rel=1e-12
        )


def test_every_block_and_value_is_on_a_page_and_every_page_has_some():
    text = "".join((studies.ROOT / p).read_text() for p in pages.PAGES)
    used = {m.group(2) for m in pages.BLOCK.finditer(text)}
    assert used == set(pages.BLOCKS)
    quoted = {m.group(2) for m in pages.VALUE.finditer(text)}
    assert quoted == set(pages.values(studies.ROOT))
    for page in pages.PAGES:
        body = (studies.ROOT / page).read_text()
        assert pages.BLOCK.search(body) or pages.VALUE.search(body), page


@pytest.fixture
def copy_of_the_docs(tmp_path):
    for page in pages.PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(studies.ROOT / page, tmp_path / page)
    shutil.copytree(studies.ROOT / "docs" / "data", tmp_path / "docs" / "data")
    return tmp_path


def test_a_changed_number_in_the_data_is_found(copy_of_the_docs):
    root = copy_of_the_docs
    assert pages.differences(root) == []
    path = root / "docs" / "data" / "final" / "runs.json"
    runs = json.loads(path.read_text())
    adamw = next(r for r in runs if r["optimizer"] == "adamw")
    adamw["val_losses"][-1] += 0.5
    path.write_text(json.dumps(runs))
    found = pages.differences(root)
    assert "docs/results.md: three-seeds differs from docs/data" in found
    assert any(line.startswith("docs/index.md:") for line in found)
    # `write` brings the page back in line, and only between the markers.
    before = (root / "docs/results.md").read_text()
    pages.write(root)
    after = (root / "docs/results.md").read_text()
    assert pages.differences(root) == []
    outside = pages.BLOCK.sub("", pages.VALUE.sub("", before))
    assert pages.BLOCK.sub("", pages.VALUE.sub("", after)) == outside


def test_a_changed_number_on_the_page_is_found(copy_of_the_docs):
    root = copy_of_the_docs
    page = root / "docs/hyperparameters.md"
    text = page.read_text()
    m = pages.VALUE.search(text)
    page.write_text(text[: m.start(3)] + "9.999" + text[m.end(3) :])
    assert pages.differences(root) == [
        f"docs/hyperparameters.md: {m.group(2)} differs from docs/data"
    ]


def test_render_replaces_between_the_markers_only(copy_of_the_docs):
    text = (
        'before <span data-value="api.sophiah.rho">old</span> after\n'
        "<!-- results: commands-winrate -->\nold\n<!-- /results -->\ntail\n"
    )
    out = pages.render(text, copy_of_the_docs)
    assert out.startswith(
        'before <span data-value="api.sophiah.rho">0.01</span> after\n'
    )
    assert "python -m sophia.experiments.winrate --out docs/data/winrate.json" in out
    assert out.endswith("<!-- /results -->\ntail\n")


def test_an_unknown_name_is_an_error_naming_the_page(copy_of_the_docs):
    with pytest.raises(KeyError, match="p.md: unknown results block 'nope'"):
        block = "<!-- results: nope -->\nx\n<!-- /results -->"
        pages.render(block, copy_of_the_docs, "p.md")
    with pytest.raises(KeyError, match="p.md: unknown value 'nope'"):
        pages.render('<span data-value="nope">x</span>', copy_of_the_docs, "p.md")


def test_missing_data_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="results run --only final"):
        studies.load_runs("final", tmp_path)


def test_run_refuses_an_unknown_study_before_running_anything(capsys):
    assert results.main(["run", "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown study 'nope'" in err and "horizon-1600" in err
    assert results.main(["run", "--jobs", "0"]) == 2


def test_check_passes_on_the_committed_pages(capsys):
    assert results.main(["check"]) == 0
    assert capsys.readouterr().out == ""


def test_sophiah_defaults_to_the_authors_gamma_h():
    # levanter's gamma_H, for the Hutchinson estimate of the mean loss's Hessian
    # (bs=1); the training script's Sophia-H uses it too, and the pages quote both
    # (checked above, through the values `api.sophiah.rho` and `train.sophiah.rho`)
    import torch

    from sophia import SophiaH
    from sophia.experiments.config import OPTIMIZER_DEFAULTS

    p = torch.nn.Parameter(torch.zeros(2))
    assert SophiaH([p]).defaults["rho"] == 0.01
    assert OPTIMIZER_DEFAULTS["sophiah"]["rho"] == 0.01
    page = (studies.ROOT / "docs/hyperparameters.md").read_text()
    assert 'data-value="api.sophiah.rho"' in page
    assert 'data-value="train.sophiah.rho"' in page
