"""Finding and reading reward checkpoints so that every failure is one line saying what to do.

- A missing, empty or wrong-kind path names the file, the flag that sets it and where the official file is
  published (`require_file`).
- State dicts are read without running pickled code (`load_weights`); a refused pickle says that the file
  would run code, whatever wording the installed torch uses.
- A checkpoint of another reward is named by the layout found in it (`describe_layout`).
- Without a local path the official Hub file is fetched; an unreachable Hub is detected once per process and
  fails at once with how to work offline, instead of retrying for ~25 s per file (`resolve_checkpoint`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import warnings
import zipfile
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch

from prefalign.errors import PrefalignError

_TRUTHY = ("1", "true", "yes", "on")


def require_file(
    path: str | Path, what: str, source: str, flag: str | None = None, directory: bool = False
) -> Path:
    """`path` as a Path if it is a non-empty file (or a directory, with `directory=True`); otherwise one line
    naming it, the flag that sets it and where the official file comes from."""
    path = Path(path).expanduser()
    hint = f"get it from {source}" + (f"; set it with {flag}" if flag else "")
    if not path.exists():
        raise PrefalignError(f"{what} not found: {path} ({hint})")
    if directory and not path.is_dir():
        raise PrefalignError(f"{what} {path} is a file, but a directory is needed ({hint})")
    if not directory and path.is_dir():
        raise PrefalignError(f"{what} {path} is a directory; pass the checkpoint file itself ({hint})")
    if not directory and path.stat().st_size == 0:
        raise PrefalignError(
            f"{what} {path} is empty (0 bytes; an interrupted download?); get it again from {source}"
        )
    return path


def refused_pickle_reason(err: BaseException) -> str | None:
    """What a `weights_only` load refused (e.g. 'an object of type argparse.Namespace'), or None when the
    error is not a refusal (a truncated or foreign file). Matches torch's wordings across versions."""
    text = str(err)
    found = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", text) or re.search(
        r"(?:global|class|type)\W+([A-Za-z_]\w*(?:\.\w+)+)", text, re.IGNORECASE
    )  # torch <= 2.x says "GLOBAL mod.Name"; other wordings name a dotted qualified name
    if found:
        return f"an object of type {found[1]}"
    if re.search(r"safe_globals|allowlist|allowed global|Unsupported (?:global|class)", text, re.IGNORECASE):
        return "Python objects"
    return None


def _torch_load_tensors(path: Path) -> object:
    """`torch.load(weights_only=True)`, memory-mapped when the file allows it (a 4 GB checkpoint is then not
    held twice while loading), without torch's TorchScript warning (load_weights raises a clearer error)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchScript archive", category=UserWarning)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format


def load_weights(
    path: str | Path, what: str, source: str, flag: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a state dict without running pickled code: safetensors, or `torch.load(weights_only=True)`.

    A checkpoint that pickles arbitrary objects (a whole nn.Module, an argparse Namespace, a TorchScript
    archive) is refused with the reason; the fix is to re-save its tensors as a plain state dict or
    safetensors. A `{"state_dict": ...}` wrapper (HPS) is unwrapped and DataParallel's `module.` dropped.
    """
    path = require_file(path, what, source, flag)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
            raise PrefalignError(f"cannot read {what} {path}: {err}") from None
    try:
        obj = _torch_load_tensors(path)
    except pickle.UnpicklingError as err:
        reason = refused_pickle_reason(err)
        if reason is None:  # not a pickle of tensors at all: truncated, corrupt or another format
            raise PrefalignError(
                f"cannot read {what} {path}: not a torch checkpoint or safetensors file"
            ) from None
        raise PrefalignError(
            f"refused to load {what} {path}: it pickles {reason}, not just tensors, and unpickling it would "
            "run code from the file; re-save its state dict with torch.save(model.state_dict()) or safetensors"
        ) from None
    except (EOFError, zipfile.BadZipFile) as err:
        raise PrefalignError(
            f"cannot read {what} {path}: truncated or not a checkpoint ({err or 'EOF'})"
        ) from None
    except RuntimeError as err:
        if "TorchScript" in str(err):
            raise PrefalignError(
                f"refused to load {what} {path}: it is a TorchScript archive (e.g. OpenAI's ViT-L-14.pt), "
                "which runs embedded code; pass a plain state dict or safetensors (open_clip's Hub weights)"
            ) from None
        raise PrefalignError(f"cannot read {what} {path}: {str(err).strip().splitlines()[0]}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PrefalignError(f"{what} {path} is not a state dict of tensors ({describe_layout(obj)})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


# Key prefixes that identify each official checkpoint, in the order they are tested.
_LAYOUTS = (
    (
        ("blip.visual_encoder.", "blip.text_encoder."),
        "an ImageReward.pt (BLIP) checkpoint: --checkpoint imagereward",
    ),
    (
        ("visual.transformer.", "transformer.resblocks."),
        "an open_clip CLIP checkpoint (HPS v2/v2.1, or "
        "open_clip weights: --checkpoint hpsv2.1, --option aesthetic.clip_checkpoint)",
    ),
    (
        ("vision_model.", "text_model."),
        "a transformers CLIP model (PickScore / CLIPScore: a model directory)",
    ),
    (("rm_head.", "visual.merger.", "model.embed_tokens."), "an HPSv3 (Qwen2-VL) checkpoint: --checkpoint hpsv3"),
    (("layers.0.weight",), "a LAION aesthetic head (--checkpoint aesthetic)"),
)


def describe_layout(obj: object) -> str:
    """Name what a loaded checkpoint object looks like, so a file given to the wrong reward says what it is."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return "a {'state_dict': ...} wrapper holding " + describe_layout(obj["state_dict"])
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    keys = [str(k).removeprefix("module.") for k in obj]
    for prefixes, name in _LAYOUTS:
        if any(k.startswith(p) for k in keys for p in prefixes):
            return name
    nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
    if nested:
        return f"a dict whose entries {nested[:3]} are dicts, not tensors"
    return f"{len(keys)} keys such as {keys[:3]}"


def load_strict(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    what: str,
    ignore: Callable[[str], bool] = lambda key: False,
    assign: bool = False,
) -> None:
    """`load_state_dict(strict=True)` minus keys the allow-list predicate `ignore` names; one-line error that
    names the layout found when it is another reward's checkpoint. `assign=True` takes the tensors over (a
    module built without initialising its parameters)."""
    try:
        result = module.load_state_dict(
            {k: v for k, v in state.items() if not ignore(k)}, strict=False, assign=assign
        )
    except RuntimeError as err:  # shape mismatches raise even when strict=False
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise PrefalignError(f"{what} does not match the architecture: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        raise PrefalignError(
            f"{what} does not match the architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); the file looks like "
            f"{describe_layout(state)}; is it the right checkpoint/model config?"
        )


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PrefalignError(f"{what} {path} is not readable JSON ({err})") from None


def hub_offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(v, "").lower() in _TRUTHY for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the Hub endpoint (HF_ENDPOINT or huggingface.co:443), once per process."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_checkpoint(
    path: str | Path | None, repo_id: str, filename: str | None, what: str, flag: str
) -> Path:
    """A local checkpoint path; when none is given, the official Hub file (the cached copy when offline or
    when the Hub is unreachable). `filename=None` resolves a whole Hub repository (a model directory)."""
    where = f"{repo_id}/{filename}" if filename else f"the Hub repo {repo_id}"
    if path is not None:
        return require_file(path, what, where, flag, directory=filename is None)
    import huggingface_hub

    def fetch(local_only: bool) -> Path:
        if filename is None:  # configs, tokenizer files and weights; not the TF/Flax/ONNX copies
            patterns = ["*.json", "*.txt", "*.safetensors", "*.bin"]
            return Path(
                huggingface_hub.snapshot_download(
                    repo_id, allow_patterns=patterns, local_files_only=local_only
                )
            )
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, local_files_only=local_only))

    offline = hub_offline()
    try:
        return fetch(local_only=True) if offline else fetch(local_only=not hub_reachable())
    except Exception as err:  # network, auth, offline-cache miss: all mean "give me a local file"
        if not offline and not hub_reachable():
            raise PrefalignError(
                f"no {what} given and the Hub is unreachable from here (no cached copy of {where}); download "
                f"it elsewhere and pass {flag}, or set HF_HUB_OFFLINE=1 to use only cached files"
            ) from None
        raise PrefalignError(
            f"no {what} given and the Hub file {where} could not be fetched ({type(err).__name__}); "
            f"download it and pass {flag}"
        ) from None
