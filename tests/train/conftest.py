import pytest

from tasks import orders


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small orders dataset (train 24, val 6, test 6) for the training-loop tests."""
    directory = tmp_path_factory.mktemp("orders")
    orders.write_splits(directory, {"train": 24, "val": 6, "test": 6})
    return directory
