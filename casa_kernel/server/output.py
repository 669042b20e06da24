"""What leaves a server, made safe to send.

``ServerOutStream`` is the servers' stdout/stderr (``--IPEngine.out_stream_factory``,
see casa_kernel/cluster/launcher.py's ENGINE_ARGS): what Python writes goes to
the cell; C-level output (fd 1/2) is not captured (CASA's log is relayed instead).

``safe_packer`` is the servers' message serializer (set on the engine's session
by ServerOutStream: ipyparallel's connection file overrides ``--Session.packer``): a lone
surrogate in an exception's message or in printed text (``"\\ud800"``) cannot be
encoded as UTF-8, jupyter_client's packer raised, and the reply was never sent
(the cell hung with its servers idle) or every stream message failed. Such
characters are replaced by U+FFFD instead; everything else is sent unchanged.
"""

from __future__ import annotations

import json
import os
import re
from typing import IO, Any

from ipykernel.iostream import OutStream
from jupyter_client.jsonutil import json_clean, json_default
from jupyter_client.session import json_packer

from casa_kernel import variables
from casa_kernel.casa.role import role_name, server_rank

# Output of one request (a cell, a task) a server sends, stdout and stderr
# together: Jupyter's own iopub limit is a rate, this is a size (50 MB printed
# per server sent 112 MB to the front end and grew the kernel to 717 MiB; an
# endless print loop, without limit). The rest goes to a file, said at the end.
OUTPUT_LIMIT = 10 * 2**20
_budget: dict[str, Any] = {"msg_id": None, "sent": 0, "dropped": 0, "file": None}

_SURROGATES = re.compile("[\ud800-\udfff]")


def safe_packer(obj: Any) -> bytes:
    """jupyter_client's JSON packer, with unencodable characters replaced."""
    try:
        return json_packer(obj)
    except UnicodeEncodeError:
        text = json.dumps(
            json_clean(obj), default=json_default, ensure_ascii=False, allow_nan=False
        )
        return _SURROGATES.sub("\ufffd", text).encode("utf-8")


class ServerOutStream(OutStream):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["watchfd"] = False
        super().__init__(*args, **kwargs)
        # the engine's one session: its replies, results and streams
        self.session.pack = safe_packer

    def write(self, string: str) -> int | None:  # type: ignore[override]
        msg_id = self.parent_header.get("msg_id")
        if msg_id != _budget["msg_id"]:
            end_request()
            _budget.update(msg_id=msg_id, sent=0, dropped=0)
        room = max(OUTPUT_LIMIT - _budget["sent"], 0)
        if len(string) <= room:
            _budget["sent"] += len(string)
            return super().write(string)
        if room:
            _budget["sent"] += room
            super().write(string[:room])
        _keep(string[room:])
        return len(string)


def overflow_path() -> str:
    """This server's file for output past OUTPUT_LIMIT (beside its CASA log)."""
    folder = os.environ.get(variables.LOG_DIR) or "/tmp"
    tag = os.environ.get(variables.LOG_TAG, "kernel")
    rank = server_rank()
    role = "rankx" if rank is None else role_name(rank)
    return os.path.join(folder, f"casa-kernel-{tag}-{role}-output.log")


def _keep(text: str) -> None:
    _budget["dropped"] += len(text)
    stream: IO[str] | None = _budget["file"]
    try:
        if stream is None:
            stream = _budget["file"] = open(  # noqa: SIM115 - closed by end_request
                overflow_path(), "a", encoding="utf-8", errors="replace"
            )
            stream.write(f"\n--- request {_budget['msg_id']}: output past {OUTPUT_LIMIT} chars\n")
        stream.write(text)
    except OSError:  # a full disk: the text is lost, the cell is not
        _budget["file"] = False


def end_request() -> None:
    """Close this request's overflow and say, in one line, what was not shown."""
    dropped, stream = _budget["dropped"], _budget["file"]
    _budget.update(dropped=0, file=None)
    if not dropped:
        return
    where = f"in {overflow_path()}" if stream else "lost: its file could not be written"
    if stream:
        stream.close()
    import sys

    err = sys.stderr
    line = (
        f"\n[casa-kernel: {dropped / 2**20:.1f} MB of output past the "
        f"{OUTPUT_LIMIT // 2**20} MB shown per cell was not sent; the full text is {where}]\n"
    )
    if isinstance(err, ServerOutStream):
        OutStream.write(err, line)  # past the limit on purpose
    else:
        err.write(line)
