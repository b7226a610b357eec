"""Shared test set-up: nothing a test does may write outside its temporary folders."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_weight_cache(tmp_path_factory):
    """Pre-trained weights cached by benchmark methods go to a per-session folder, not ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CRYOSIFT_CACHE", str(tmp_path_factory.mktemp("cryosift-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny convolutions run fastest on one thread (and far faster on a busy machine); modules
    opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
