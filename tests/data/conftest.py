import pytest

from eegfast.datasets import SampleDataError, sample


@pytest.fixture(scope="session")
def sample_files():
    """{name: path} of the real sample recordings (../shared/data in a checkout)."""
    try:
        paths = sample(download=False)
    except SampleDataError as err:
        pytest.skip(f"sample data not available: {err}")
    return {p.name: p for p in paths}
