"""The error every model loader raises, apart from the registry so that a loader need not import it."""


class ModelUnavailableError(RuntimeError):
    """A model name that cannot be loaded here, with the reason and what to do instead."""
