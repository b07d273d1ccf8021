"""What the command line prints besides results: error lines kept to one readable line, and quiet libraries."""

from __future__ import annotations

import errno
import os
import sys

ERROR_LINE_LIMIT = 400  # characters; a 10,000-character prompt must not become a 20 KB error line
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def one_line(message: str, limit: int = ERROR_LINE_LIMIT) -> str:
    """The message on one line, its middle elided when longer than `limit` (the end usually says the fix)."""
    text = " ".join(str(message).split())
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[: limit - tail - 5]} ... {text[-tail:]}"


def quiet_third_party_logs() -> None:
    """No progress bars or info chatter from transformers / diffusers / huggingface_hub: prefalign reports its
    own progress (the demo used to print transformers' "Loading weights" bar ten times)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("transformers", "diffusers"):  # already imported: the environment is read at import time
        if name in sys.modules:
            logging = __import__(f"{name}.utils.logging", fromlist=["logging"])
            logging.set_verbosity_error()
            logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
