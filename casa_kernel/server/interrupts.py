"""Where SIGINT lands on a server: in the job it is meant for, never in the
engine's handling of a request (server/engine.py installs it at set-up)."""

from __future__ import annotations

import signal
from typing import Any


def only_in_jobs() -> None:
    """SIGINT interrupts a job (ipyparallel's ``do_apply``: unpacking, the call,
    packing its value, whose KeyboardInterrupt becomes the job's error reply),
    never the engine's handling around it. ipykernel raises KeyboardInterrupt
    for the whole request; landing after ``do_apply`` (flushing the streams,
    sending the reply) it is caught and logged, the reply never sent, and the
    kernel waited for it for ever (seen: a cube worker interrupted as its job
    ended, under load). Outside a job the engine's idle handler answers SIGINT."""
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None or getattr(kernel, "casa_kernel_jobs_only", False):
        return
    kernel.casa_kernel_jobs_only = True
    do_apply = kernel.do_apply

    def pre_handler_hook() -> None:  # ipykernel's put default_int_handler here
        kernel.saved_sigint_handler = signal.getsignal(signal.SIGINT)

    def do_apply_interruptible(*args: Any, **kwargs: Any) -> Any:
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return do_apply(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, previous)

    kernel.pre_handler_hook = pre_handler_hook
    kernel.do_apply = do_apply_interruptible
