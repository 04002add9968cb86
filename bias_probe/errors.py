"""The one exception type for bad input: the CLI prints it as one line and exits with code 2."""


class BiasProbeError(ValueError):
    """A problem with the user's input (dataset, attribute, data dir, model), worded with the fix."""
