r"""Run `python -m sophia`: the toy-problem demo of `sophia.experiments.demo`."""

import sys

from .experiments.demo import main

sys.exit(main())
