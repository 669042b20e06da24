"""A plain CASA process, no cluster at all: the serial baseline and the 2-process limit.

Started by bench/p1_casa.py with the runtime venv's python (no casampi), it imports
casatasks once, says it is ready, then runs commands read from stdin, one JSON
object a line: ``{"task": "flagdata", "calls": [{...kwargs...}, ...]}`` runs the
calls one after another and answers ``{"elapsed": s, "error": ...}``;
``{"op": "quit"}`` ends it. Answers are the lines of stdout that start with the
marker, so anything CASA prints is ignored.
"""

import json
import os
import sys
import time

MARK = "@@BENCH@@"


def answer(payload):
    sys.stdout.write(MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def peak_mib():
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024.0
    return None


def main():
    import casatasks

    casatasks.casalog.filterMsg(
        ["***** consolidateResults, subMS:", "Leap second table TAI_UTC seems out-of-date"]
    )
    casatasks.casalog.showconsole(False)
    answer({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        task = getattr(casatasks, cmd["task"])
        error = None
        each = []
        t0 = time.perf_counter()
        try:
            for kwargs in cmd["calls"]:
                t1 = time.perf_counter()
                ret = task(**kwargs)
                each.append(time.perf_counter() - t1)
                if ret is False:
                    error = f"{cmd['task']} returned False for {kwargs.get('vis')}"
        except Exception as exc:  # reported to the parent, which fails the run
            error = f"{type(exc).__name__}: {exc}"
        answer(
            {
                "elapsed": time.perf_counter() - t0,
                "each": each,
                "error": error,
                "peak_mib": peak_mib(),
            }
        )


if __name__ == "__main__":
    main()
