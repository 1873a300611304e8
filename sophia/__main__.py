r"""Run `python -m sophia`: the toy-problem demo of `sophia.demo`."""

import sys

from .demo import main

sys.exit(main())
