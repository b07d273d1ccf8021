"""Resolve a pipeline directory or Hugging Face Hub id to a local diffusers pipeline directory, offline-safe.

Every Hub failure (offline mode, no network, missing cache) becomes one `PrefalignError` line, so the CLI
exits with code 2 instead of a traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from prefalign.errors import PrefalignError

# "name" or "owner/name" as the Hub spells repository ids; anything else that does not exist is a bad path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set now (huggingface_hub reads it only at import, tests set it later)."""
    import huggingface_hub

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return flag or huggingface_hub.is_offline_mode()


@contextlib.contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub/diffusers download failures for `repo_id` into one-line `PrefalignError`s."""
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    try:
        yield
    except GatedRepoError:
        raise PrefalignError(
            f"'{repo_id}' is a gated Hugging Face Hub repository; accept its licence and log in "
            "(huggingface-cli login), or pass a local pipeline directory"
        ) from None
    except RepositoryNotFoundError:
        raise PrefalignError(
            f"'{repo_id}' is not a repository on the Hugging Face Hub (nor a local directory); "
            "check the id or path"
        ) from None
    except (OSError, EntryNotFoundError, ConnectionError):
        # Offline mode, DNS/connection failures and cache misses all surface as OSError subclasses.
        raise PrefalignError(
            f"cannot load '{repo_id}' from the Hugging Face Hub (offline or unreachable); "
            "pass a local pipeline directory or set HF_HOME to a cache that has it"
        ) from None


def resolve_pipeline_dir(path_or_hub_id: str | Path) -> Path:
    """An existing directory with model_index.json, or the cached snapshot of a Hub pipeline (fetched online).

    Hub downloads go through `diffusers.DiffusionPipeline.download`, which picks the files a pipeline needs.
    """
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise PrefalignError(
                f"{path} is not a diffusers pipeline directory: model_index.json is missing "
                "(save one with DiffusionModel.save_pretrained or diffusers' pipeline.save_pretrained)"
            )
        return path
    name = str(path_or_hub_id)
    if not HUB_ID.match(name):
        raise PrefalignError(
            f"pipeline directory {name} does not exist; pass an existing directory or a Hub id"
        )
    from diffusers import DiffusionPipeline

    with hub_errors(name):
        return Path(DiffusionPipeline.download(name, local_files_only=hub_offline()))
