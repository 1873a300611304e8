r"""
---
title: python -m sophia.experiments.results
summary: One command for the results pages, run the documented studies, write the pages from their data, or check that the pages say what the data says.
---

Every table and quoted number of the [results](../../results.md) page (and a few on
the hyperparameters, landing and algorithm pages) comes from data, by three commands:

```
python -m sophia.experiments.results run [--jobs 2] [--only NAME ...] [--force]
python -m sophia.experiments.results write
python -m sophia.experiments.results check
```

* `run` runs each [documented study](studies.html) whose data is missing (all of
  them with `--force`; about an hour on two CPU cores, `--jobs 2` runs two at once)
  and keeps its data under `docs/data/`;
* `write` regenerates [the pages' tables, quoted numbers and figures](pages.html)
  from `docs/data/`;
* `check` says which page's block differs from the data, and exits 1 if one does
  (the test suite runs it).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor

from .pages import differences, write
from .studies import ROOT, STUDIES, WINRATE, has_data, run_study


def main(argv: list[str] | None = None) -> int:
    r"""`run`, `write` or `check`; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m sophia.experiments.results",
        description="Run the documented studies, and write or check the results "
        "pages from their data.",
    )
    parser.add_argument("command", choices=("run", "write", "check"))
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="these studies only (run)"
    )
    parser.add_argument(
        "--force", action="store_true", help="rerun studies that have data (run)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="studies at once (run; default 1)"
    )
    args = parser.parse_args(argv)
    names = [*STUDIES, WINRATE]
    if not (ROOT / "docs").is_dir():
        print(
            f"{parser.prog}: error: no docs/ beside {ROOT / 'sophia'}: this "
            "command works in a clone of the repository",
            file=sys.stderr,
        )
        return 2
    if args.command == "run":
        unknown = sorted(set(args.only or []) - set(names))
        if unknown:
            print(
                f"{parser.prog}: error: unknown study {unknown[0]!r}; "
                f"studies: {', '.join(names)}",
                file=sys.stderr,
            )
            return 2
        if args.jobs < 1:
            print(
                f"{parser.prog}: error: --jobs must be >= 1, got {args.jobs}",
                file=sys.stderr,
            )
            return 2
        todo = [n for n in (args.only or names) if args.force or not has_data(n)]
        with ThreadPoolExecutor(args.jobs) as pool:
            for name, _ in zip(todo, pool.map(run_study, todo)):
                print(f"ran {name}")
        return 0
    if args.command == "write":
        for path in write():
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    found = differences()
    for line in found:
        print(line)
    if found:
        print("regenerate with: python -m sophia.experiments.results write")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
