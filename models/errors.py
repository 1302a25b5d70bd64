"""The base of every error that reports bad input (a file, a config value, an argument) rather than
a bug: the stages print these as one line and exit with status 2 (stages/_cli.run_main), while
any other exception keeps its traceback."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input the user can fix; the message names the file, field or value and what was expected."""
