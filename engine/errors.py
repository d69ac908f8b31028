"""The one exception type a user sees for bad input.

Every message names the problem and the fix on one line; the CLI prints it without a traceback.
"""


class ConfigError(ValueError):
    """Bad configuration or bad input data, detected before long work starts."""
