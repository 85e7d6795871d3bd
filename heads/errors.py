"""The one error type of stage two that a user causes and can fix: a bad option, spec or setting.

It lives at the bottom of ``heads/`` so that every wing can raise it (reports included, which import
nothing that trains); ``cli.py`` turns it into one ``error:`` line. It is a ``ValueError``, so code
that validates with the standard library's errors is caught the same way.
"""
from __future__ import annotations


class OptionError(ValueError):
    """A method option, training setting or spec that does not exist or does not parse; the message
    names the option and lists what is valid."""
