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
    "Interrupted",
    "TrainingInterrupted",
    "TrainingDiverged",
    "OutOfMemory",
    "caused_by_interrupt",
    "first_line",
    "described",
    "out_of_memory",
    "asked_memory",
]


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters, or its type's name when it has
    none: third-party errors run on for paragraphs, and every message here is one line."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is running out of memory: Python's MemoryError, torch's OutOfMemoryError (CUDA; matched
    by name, so that this module needs no torch), or the CPU allocator's RuntimeError ("DefaultCPUAllocator:
    can't allocate memory")."""
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error)))


def asked_memory(error: BaseException) -> str:
    """What an out-of-memory error asked for, in a few words: the CPU allocator's byte count as GiB ("you tried
    to allocate 26214400000 bytes"), CUDA's own "Tried to allocate 2.00 GiB", else the error's first line."""
    import re

    text = str(error)
    if (m := re.search(r"allocate (\d+) bytes", text)) is not None:
        return f"{int(m.group(1)) / 2**30:.1f} GiB asked of the host"
    if (m := re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", text)) is not None:
        return f"{m.group(1)} asked of the GPU"
    return first_line(error, 120)


def described(exc: BaseException, limit: int = 200) -> str:
    """``<Type>: <first line>``, or ``<Type>`` alone for an exception without a message."""
    text = str(exc).strip()
    return type(exc).__name__ + (f": {first_line(exc, limit)}" if text else "")


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

    def __init__(self, package: str, extra: str, alternative: str = ""):
        """``alternative``: another way to get it, said after the extra (e.g. another extra and when it fits)."""
        super().__init__(f"{package} is not installed: pip install 'snncompile[{extra}]'"
                         + (f" ({alternative})" if alternative else ""))
        self.package = package
        self.extra = extra
        self.alternative = alternative

    def __reduce__(self):
        # rebuilt from its own arguments when a worker process raises it (the default passes the message only)
        return type(self), (self.package, self.extra, self.alternative)


class ExportError(SnnCompileError):
    """ONNX export failed."""


class InputError(SnnCompileError):
    """An input tensor has the wrong rank, shape, T or dtype."""

    exit_code = 2


class RunnerUnavailableError(SnnCompileError):
    """A runner's runtime, provider or device is not present on this machine."""


class Interrupted(SnnCompileError):
    """Ctrl-C: the command stopped; the message says what the run directory kept."""

    exit_code = 130  # the shell's code for a SIGINT


class TrainingDiverged(SnnCompileError):
    """The loss or the weights became inf/nan: the epoch is not checkpointed, the message says what was kept."""


class OutOfMemory(SnnCompileError):
    """torch ran out of memory (host or GPU) during training: the message names the batch size to lower."""


class TrainingInterrupted(Interrupted):
    """Ctrl-C during training: the message says which checkpoint survived and how to continue; ``survived``
    is the first half alone, for a caller that continues another way (the pipeline: run it again)."""

    def __init__(self, survived: str, next_step: str):
        super().__init__(f"{survived}; {next_step}")
        self.survived = survived


def caused_by_interrupt(error: BaseException) -> bool:
    """Whether ``error`` is a Ctrl-C or was raised while handling one. A library that catches ``Exception``
    turns an interrupt it happened to be inside into its own error (torch.onnx.export: a module half
    imported when the KeyboardInterrupt hit, then an AttributeError, then "Failed to export the model"):
    the chain of causes and contexts still holds the KeyboardInterrupt."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False
