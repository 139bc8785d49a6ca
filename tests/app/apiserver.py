"""Former home of the API test harness, now in tests/support: re-exported for tests not moved yet."""

from support.harness import (  # noqa: F401
    API_KEY,
    MAIN_SERVER_ENV,
    MODES,
    OTHER_API_KEY,
    ROOT,
    Server,
    running_server,
    start_server,
)
from support.weights import TEST_MODELS, make_weights  # noqa: F401
