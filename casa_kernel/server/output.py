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
import re
from typing import Any

from ipykernel.iostream import OutStream
from jupyter_client.jsonutil import json_clean, json_default
from jupyter_client.session import json_packer

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
