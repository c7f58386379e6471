"""Shared test set-up."""

import pytest
import torch

# Tests use small tensors: one intra-op thread avoids the thread-pool overhead (and the
# oversubscription on shared 2-core machines) that would otherwise dominate their run time.
torch.set_num_threads(1)

# The store's writer process (icstools.store.process) costs about a second of CPU to start, and
# most tests' runs fill a chunk: they would start one each. These modules test the store's
# paths, the writer process included, as a user gets them (the default "auto"); elsewhere the
# store is written from a thread, which gives the same store (tests/test_store_process.py).
_DEFAULT_WRITER = {
    "test_store_process",
    "test_recorder_store",
    "test_record_buffer",
    "test_resume",
    "test_hardening_store",
}


@pytest.fixture(autouse=True)
def _store_writer_thread(request, monkeypatch):
    if request.module.__name__.rsplit(".", 1)[-1] not in _DEFAULT_WRITER:
        monkeypatch.setenv("ICSTOOLS_STORE_WRITER", "thread")
