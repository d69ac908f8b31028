import pytest

from teachers import train_digits_teacher


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    return train_digits_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")
