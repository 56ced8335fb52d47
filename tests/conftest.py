from __future__ import annotations

import os

# Before engine.shm is imported: this run's segments (its children's too) carry
# the run's pid, so the leak check never counts another run's segments.
os.environ["MULTIFD_SEGMENT_TAG"] = f"t{os.getpid()}-"

import pytest  # noqa: E402

from tests.leaks import Snapshot, leftovers

HEAVY = os.environ.get("MULTIFD_HEAVY") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HEAVY:
        return
    skip = pytest.mark.skip(reason="heavy variant; set MULTIFD_HEAVY=1 to run it")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves a child process, thread, /dev/shm segment or fd."""
    before = Snapshot.take()
    yield
    problems = leftovers(before)
    assert not problems, "; ".join(problems)
