r"""What the tests share: how a test says that this machine lacks a tool it needs.

The docs tests need tools that pip does not install: `npm` (the site's build installs
KaTeX with it) and Debian's `chromium` and `chromium-driver` (the browser test).
Where one is missing, such a test is skipped with the command that installs it, so
that the README's quick start runs on a machine without them; under `CI=true`, where
`.ci/run` installs them, a missing tool is a failure, so the tests cannot silently
stop running there.
"""

import os

import pytest


def require(available: bool, what: str) -> None:
    r"""Skip the test (fail it under `CI=true`) unless `available`; `what` says what is missing and how to install it."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(what)
    pytest.skip(what)
