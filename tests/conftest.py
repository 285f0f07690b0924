"""Settings for the whole suite.

Hypothesis: no per-example deadline. The property tests check what happens to the
money and the protocols, not how long an example takes; `make test` runs the suite
on several workers at once, where a 200 ms deadline would fail a correct example on a
busy machine. Everything else is the profile already loaded (a tool that runs the
tests in-process, such as the mutation run, keeps its own choices).
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("extrabalance-suite", parent=settings.default, deadline=None)
settings.load_profile("extrabalance-suite")
