import pytest


@pytest.fixture(autouse=True)
def _leak_check(no_leaks):
    """Every test here runs real processes, sockets and shared memory: check leaks."""
    yield
