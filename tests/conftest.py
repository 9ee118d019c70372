from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.config import Settings, load_settings
from core.db import make_sessionmaker

torch.set_num_threads(2)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({"APP_HOME": str(tmp_path / "home")})


@pytest.fixture
def Session(settings: Settings):
    return make_sessionmaker(settings.database_url)
