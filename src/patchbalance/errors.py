"""The exception types that patchbalance raises for problems a user can fix."""

from __future__ import annotations


class PatchbalanceError(Exception):
    """A problem with the user's configuration or input.

    The message is one line that names the file, row or key and says how to fix it. The command
    line turns it into that line on stderr and exit status 2, without a traceback.
    """


class ConfigError(PatchbalanceError):
    """The configuration file is missing, unparsable or invalid."""


class InputError(PatchbalanceError):
    """The records, rasters, tables or embeddings that the configuration points at are unusable."""


class OutputError(PatchbalanceError):
    """An output cannot be written where the configuration asks."""


class MissingDependencyError(PatchbalanceError):
    """An optional dependency that the chosen option needs is not installed."""

    def __init__(self, what: str, extra: str, package: str | None = None) -> None:
        install = f'pip install "patchbalance[{extra}]"'
        if package:
            install += f" (or: pip install {package})"
        super().__init__(f"{what} is not installed; install it with: {install}")
