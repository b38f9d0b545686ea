import pytest

from dspy_opro.local import register


@pytest.fixture(scope="module")
def litellm():
    """litellm, with the local provider registered."""
    register()
    import litellm as module

    return module
