"""Hugging Face hub conventions: the card's YAML metadata, and ``--push-to-hub`` after the export.

The metadata follows the hub's model-card fields (``huggingface_hub.ModelCardData``):
``base_model`` (the source, when it is a hub id, or the ``base_model`` a local source's own card
names), ``library_name: transformers``, ``pipeline_tag: text-generation``, ``tags`` and the
``license`` carried over from the source's card when it is known. Nothing here touches the
network except :func:`push_folder`, and a card that cannot be read is skipped, never an error.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from amp_prune.errors import AmpPruneError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _card_data(readme: Path) -> dict:
    """``base_model`` and ``license`` from a local model card's YAML header ({} when unreadable)."""
    try:
        from huggingface_hub import ModelCard
        data = ModelCard.load(readme).data.to_dict()
    except Exception as e:  # noqa: BLE001 - a card we cannot parse only loses its metadata
        log.debug("cannot read the card %s: %s", readme, e)
        return {}
    return {k: data[k] for k in ("base_model", "license") if data.get(k)}


def source_metadata(source: str, path: Path | None, known: dict[str, dict]) -> dict:
    """What the card can say about where the model came from: ``base_model`` and ``license`` when known.

    ``known`` maps built-in model names to their card data.
    """
    if source in known:
        return dict(known[source])
    if path is not None:
        readme = (path if path.is_dir() else path.parent) / "README.md"
        return _card_data(readme) if readme.is_file() else {}
    return {"base_model": source} if _HUB_ID.match(source) else {}


def card_header(meta: dict, tags: list[str]) -> str:
    """The card's YAML front matter, ``---`` fenced."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=meta.get("base_model"), license=meta.get("license"), library_name="transformers",
                         pipeline_tag="text-generation", tags=tags)
    return f"---\n{data.to_yaml()}\n---"


def check_repo_id(repo_id: str) -> None:
    """A one-line error for a malformed ``--push-to-hub`` id (checked before any work)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise AmpPruneError(f"--push-to-hub {repo_id!r} is not a hub repo id; use NAMESPACE/NAME, e.g. "
                            "me/llama3-8b-amp30") from None
    if "/" not in repo_id:
        raise AmpPruneError(f"--push-to-hub {repo_id!r} has no namespace; use NAMESPACE/NAME, e.g. me/{repo_id}")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload the exported ``folder`` to ``repo_id`` (created if missing); returns the repo URL.

    Offline, unauthenticated or refused, it raises one line that says the local export is complete.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload a model pruned by amp-prune")
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors all end the same way for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise AmpPruneError(f"the export in {folder} is complete, but the upload to {repo_id} failed ({first}); "
                            f"log in with `hf auth login` and check the network, then run `hf upload {repo_id} "
                            f"{folder}`") from None
    return str(url)
