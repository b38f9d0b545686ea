"""Loading from Hugging Face `datasets`, with one clear error when the hub cannot be reached."""

from __future__ import annotations

from typing import Any


def load_from_hub(path: str, name: str | None, split: str, *, local_hint: str) -> Any:
    """``datasets.load_dataset(path, name, split=split)``, or a `RuntimeError` saying how to load offline."""
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # offline, unknown config, hub errors: all end the same way for the user
        raise RuntimeError(
            f"could not load {path}{'/' + name if name else ''} ({split}) through `datasets`: "
            f"{type(exc).__name__}: {exc}. Without network access, pass data_dir= (or --data-dir) {local_hint}."
        ) from exc
