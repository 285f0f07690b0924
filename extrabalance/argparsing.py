"""The command line's parser: a usage error is one line that names the input and says
where help is, exit status 2 (argparse's own prints the whole usage first)."""

from __future__ import annotations

import argparse
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")
