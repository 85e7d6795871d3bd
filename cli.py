"""Command line of the tool: extract features once (stage one), train heads on them many times (stage two).

Run ``python cli.py --help`` for the commands and ``python cli.py methods`` for every method's options.
This file is the typer face: the app, the one place that turns the tool's errors into one ``error:``
line (``friendly``), and each package's commands, registered from its command module
(``pipeline/commands.py``, ``heads/commands.py``, ``cache/commands.py``; docs/architecture.md).
Stage-two commands import torch and the cache only.
"""
from __future__ import annotations

import functools
import signal
import sys
import threading

try:
    import typer
except ModuleNotFoundError:  # `python cli.py` with a Python that is not the project's environment
    sys.exit("error: typer is not installed for this Python; run `make env`, then `.venv/bin/python cli.py …` "
             "(or `source .venv/bin/activate`)")

# rich_markup_mode=None: help is plain text, so option syntax in brackets (edm[order=strong-to-weak])
# shows as written instead of being read as rich markup and dropped.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Study and fix modality imbalance: extract features once, train heads fast.")

from cache import commands as cache_commands  # noqa: E402  (cache info/verify, import-features, make-synthetic)
from heads import commands as heads_commands  # noqa: E402  (stage two: train-head, compare, grid, …; lazy inside)
from heads import commands_runs as heads_runs_commands  # noqa: E402  (stage two's readers: report, runs, predict, methods)
from pipeline import commands as pipeline_commands  # noqa: E402  (stage one: extract, datasets, backbones; lazy inside)


def fail(message: str, code: int = 2):
    """One clear line on stderr and a non-zero exit: bad input never produces a traceback."""
    message = " ".join(part.strip() for part in str(message).splitlines() if part.strip())  # one line, always
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds exactly like Ctrl-C.

    A subclass of KeyboardInterrupt on purpose: every ``except KeyboardInterrupt`` / ``finally`` that
    stops workers and keeps finished runs handles a scheduler's SIGTERM too.
    """


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def os_message(err: OSError) -> str:
    """An ``OSError`` as one line with its path(s): permission, not a directory, is a directory, name
    too long, no space left (``[Errno 28] …`` becomes ``No space left on device: runs/x``)."""
    if not err.filename:
        return str(err.strerror or err)
    where = f"{err.filename}" + (f" → {err.filename2}" if err.filename2 else "")
    return f"{err.strerror or err}: {where}"


def friendly(func):
    """Turn the tool's own error types, every OSError and MemoryError, Ctrl-C and SIGTERM into one-line
    messages: a fault the user can fix (bad input, a full disk, a folder one may not write to, a model
    too big for the machine) never ends in a traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from cache import CacheError
        from heads.errors import OptionError

        main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
        previous = signal.signal(signal.SIGTERM, _terminate) if main else None
        try:
            return func(*args, **kwargs)
        except (CacheError, OptionError, ValueError) as err:
            fail(str(err))
        except OSError as err:
            fail(os_message(err) if err.filename or err.strerror else str(err))
        except MemoryError as err:
            fail(f"out of memory: {err}" if str(err) else "out of memory; use a smaller --hidden, --batch-size or cache")
        except Terminated as err:  # a command that knows more (train-head: how to resume) says it in err
            fail(str(err) or "terminated; finished runs are kept, rerun the same command to resume", 143)
        except KeyboardInterrupt as err:
            fail(str(err) or "interrupted; finished runs are kept, rerun the same command to resume", 130)
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
    return wrapper


pipeline_commands.register(app)
heads_commands.register(app, friendly)
cache_commands.register(app, friendly)
heads_runs_commands.register(app, friendly)


def main():
    """The installed commands (`modality-balance`, `mb`; see pyproject.toml) are this file."""
    app()


if __name__ == "__main__":
    main()
