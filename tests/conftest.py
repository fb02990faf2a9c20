import os
from pathlib import Path

import pytest

os.environ.setdefault("RETRIEVAL_JAX_NO_PROGRESS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    return Path(os.environ.get("RETRIEVAL_JAX_DATA", REPO.parent / "shared" / "data"))


def require_data(sub: str) -> Path:
    """The real data folder ``sub`` of ../shared/data, or skip with the reason."""
    path = data_dir() / sub
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set RETRIEVAL_JAX_DATA to the shared data dir)")
    return path
