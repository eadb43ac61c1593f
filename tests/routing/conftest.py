"""A gateway key and a client holding it, for the tests that talk to the gateway API."""

import pytest

from tests.factories import ApiKeyFactory
from tests.routing.gateway import Gateway


@pytest.fixture
def key():
    return ApiKeyFactory(name="gateway")


@pytest.fixture
def gw(key):
    return Gateway(key.plaintext)
