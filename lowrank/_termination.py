"""Signals that end the process, turned into an exception that the `lowrank` command
(`lowrank.cli.main`) installs handlers for, and that the writers check before an output is
put in place (`lowrank.io.files.Staging`), so that a termination whose exception was
swallowed on its way (a bare `except:` in user code, a finalizer: Python prints an
exception raised in a `__del__` or a weakref callback and goes on) still leaves no output.

Nothing here acts unless `terminate` is a signal's handler, which only `main` makes it: the
library called from Python is unaffected.
"""

from __future__ import annotations

import signal
from typing import NoReturn

ENDING_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name)
)
"""Signals whose default action ends the process where it stands (SIGQUIT also dumps core),
which would leave the temporary files of the outputs being written; `main` turns each that
is at its default into `Terminated`. Ctrl-C's SIGINT is Python's `KeyboardInterrupt`
already."""


class Terminated(BaseException):
    """One of `ENDING_SIGNALS` (`signum`), raised in the main thread so that the writers in
    progress remove their outputs as it unwinds; a `BaseException`, so that the guards
    around user code (which catch `Exception` and `SystemExit`) let it through."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


RECEIVED: list[int] = []
"""The signals `terminate` received, in order; emptied by the `main` call that installed it.
Code that swallows `Terminated` does not cancel the command: `raise_if_terminated` raises it
again."""


def terminate(signum: int, frame: object) -> NoReturn:
    """The handler `main` installs: record `signum` and raise `Terminated`; the other ending
    signals handled here are ignored from now on, so that a second one cannot cut the
    cleanup short."""
    for other in ENDING_SIGNALS:
        if signal.getsignal(other) is terminate:
            signal.signal(other, signal.SIG_IGN)
    RECEIVED.append(signum)
    raise Terminated(signum)


def raise_if_terminated() -> None:
    """Raise `Terminated` for the first signal `terminate` received, if any: at the points
    where a command must not go on (an output about to be put in place, a command about to
    report success) once a termination was asked for, even one whose exception was
    swallowed."""
    if RECEIVED:
        raise Terminated(RECEIVED[0])
