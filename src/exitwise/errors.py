"""User-facing errors: the CLI prints these as one line; anything else is a bug and shows a traceback."""


class ExitwiseError(Exception):
    """Base class for errors caused by input, files or environment (not by exitwise itself)."""


class ModelNotFoundError(ExitwiseError):
    """Weights could not be found or fetched; the message says how to get them."""


class DataError(ExitwiseError, ValueError):
    """A data, task or configuration file is malformed; the message names file, line and field."""


class IncompatibleError(ExitwiseError):
    """An artefact (database, heads, classifier) was made for another model, task or label set."""


class OverwriteError(ExitwiseError, FileExistsError):
    """An output path exists and is not exitwise's to replace (no --overwrite, or not a file it made)."""
