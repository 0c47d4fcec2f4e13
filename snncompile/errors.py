"""One exception hierarchy; the CLI prints any of these as a single line and exits non-zero."""

__all__ = [
    "SnnCompileError",
    "ConfigError",
    "DataError",
    "ArtifactError",
    "MissingDependencyError",
    "ExportError",
    "InputError",
    "RunnerUnavailableError",
    "TrainingInterrupted",
]


class SnnCompileError(Exception):
    """Base class: an error the user can act on, shown as one line."""

    exit_code = 1


class ConfigError(SnnCompileError):
    """A bad model TOML or `--set` override (unknown key, wrong type, bad value)."""

    exit_code = 2


class DataError(SnnCompileError):
    """A dataset folder or file is missing or malformed."""


class ArtifactError(SnnCompileError):
    """A run directory, checkpoint or exported model is missing, corrupt or from another version."""


class MissingDependencyError(SnnCompileError):
    """An optional dependency is not installed; the message names the pip extra."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"{package} is not installed: pip install 'snncompile[{extra}]'")
        self.package = package
        self.extra = extra

    def __reduce__(self):
        # rebuilt from its own arguments when a worker process raises it (the default passes the message only)
        return type(self), (self.package, self.extra)


class ExportError(SnnCompileError):
    """ONNX export failed."""


class InputError(SnnCompileError):
    """An input tensor has the wrong rank, shape, T or dtype."""

    exit_code = 2


class RunnerUnavailableError(SnnCompileError):
    """A runner's runtime, provider or device is not present on this machine."""


class TrainingInterrupted(SnnCompileError):
    """Ctrl-C during training: the message says which checkpoint survived and how to continue."""

    exit_code = 130  # the shell's code for a SIGINT
