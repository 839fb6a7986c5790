"""The project's single error type for user mistakes.

Library code raises :class:`DPImgSynError` with a message that says what is wrong and
what to do; only the command-line entry points turn it into ``error: ...`` and exit 2.
"""


class DPImgSynError(Exception):
    """A user-facing error: bad input, missing data or files, infeasible budget, wrong artifact."""
