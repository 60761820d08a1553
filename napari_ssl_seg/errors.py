"""Exceptions raised by napari-ssl-seg.

Each subclasses a builtin too, so callers that catch ``ValueError`` or ``OSError``
keep working.
"""


class SslSegError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(SslSegError, ValueError):
    """An image, a label array or an argument breaks the documented contract."""


class ProjectError(SslSegError, ValueError):
    """A project directory is missing, is not a project, or is damaged."""


class SignatureMismatchError(ProjectError):
    """The image given does not match the image the project was made for."""


class UnsupportedFileError(SslSegError, ValueError):
    """A file whose format we cannot read or write."""


class ProjectLockedError(ProjectError):
    """Another process (or thread) is writing the project and did not finish in time."""


class PathExistsError(SslSegError, FileExistsError):
    """A call would replace an existing file or directory and was not asked to.

    ``path`` names it, so each front end can say how its user asks: ``overwrite=True``
    in Python, ``--overwrite`` on the command line.
    """

    def __init__(self, path, message: str | None = None) -> None:
        self.path = path
        super().__init__(message or f"{path} already exists; pass overwrite=True to replace it")
