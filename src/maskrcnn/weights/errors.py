"""The error every checkpoint reader raises."""


class WeightsError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the keys."""
