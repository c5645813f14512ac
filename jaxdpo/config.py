"""Config checks that run before anything is compiled: a bad config is a one-line error, not a trace."""


class ConfigError(ValueError):
    """A problem with the user's config or inputs; train.py prints it in one line and exits non-zero."""
