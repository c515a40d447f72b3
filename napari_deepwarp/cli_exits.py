"""How a ``deepwarp`` command ends: exit codes, one-line errors and notes, and signals.

Exit codes: 0 done; 2 bad input, a full disk or an output folder that cannot be written (one
line ``deepwarp: error: ...``, nothing written); 3 ``--if-worse fail``; 4 the deformable stage
gave a field with NaN or infinite values (nothing written); 130 Ctrl-C; 143 SIGTERM (both remove
what was being written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: bad input, a full disk or an output folder that cannot be written: one line, nothing written
EXIT_BAD_INPUT = 2
#: ``--if-worse fail`` and the deformable stage made the pair worse than the affine stage
EXIT_WORSE = 3
#: the deformable stage's field is not finite (NaN or infinite values): nothing to hand back
EXIT_NOT_FINITE = 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM, as shells report


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (``deepwarp register: error: argument --refine:
    -1 is negative; give 0 or more (see deepwarp register -h)``) rather than the usage first;
    subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same cleanup runs."""


def output_folder(args) -> tuple[Path, str] | None:
    """The folder a command writes into (checked before any work), and its option."""
    output = getattr(args, "output", None)
    if output is None:
        return None
    if args.command in ("register", "register-batch", "demo"):
        return Path(output), "-o"
    if Path(output).is_dir():  # warp and train write one file
        from napari_deepwarp.core.io import InputError

        raise InputError(f"{output}: -o names an existing folder; give a file path")
    return Path(output).parent, "-o"


def os_error(exc: OSError, folder: Path | None) -> str:
    """One line for an OSError: a full disk or a folder that cannot be written names the output
    folder and the fix; anything else its file and reason."""
    import errno

    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = folder or exc.filename or "output"
        return f"{where}: {reason}; free some space or give another output folder (-o)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.filename or folder}: {reason}; give a folder you can write to (-o)"
    if exc.errno is None:
        return str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def show_notes(previous):
    """A ``warnings.showwarning`` that prints :class:`~napari_deepwarp.core.io.InputNote`
    warnings as one line ``deepwarp: note: ...`` on stderr and passes others to ``previous``."""
    from napari_deepwarp.core.io import InputNote

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, InputNote):
            print(f"deepwarp: note: {message}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


def on_sigterm(signum, frame):
    raise Terminated()
