"""User-facing errors: one line that names the problem and the fix."""


class AmpPruneError(ValueError):
    """Bad input or environment. The CLI prints it as one line and exits with code 2."""
