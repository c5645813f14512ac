"""The error types a user sees. Imports nothing from jaxdpo, so every module can raise them.

`ConfigError`: a problem with the user's config or inputs (a key, a file, a data row, the mesh).
`python -m jaxdpo.train` prints it as one line, `jaxdpo: ...`, and exits with status 2.
"""


class ConfigError(ValueError):
    """A problem with the user's config or inputs; train.py prints it in one line and exits non-zero."""
