"""Errors of the library a user can cause and fix: their message says what is wrong and what to run.

A job or CLI turns them into one line on stderr and exit status 2 (never a stack trace); anything else is a bug.
"""

from __future__ import annotations


class InputDataError(ValueError):
    """A folder or file the user named is missing, empty, or not the output of the step that should have made it."""
