"""Former home of the API tests' images and checks, now in tests/support: re-exported for tests not
moved yet."""

from support.images import encode, exif_rotated, jpeg, pattern, png, png_bomb_header, real_png_bomb  # noqa: F401
from support.metrics import histogram_buckets, metric  # noqa: F401
from support.problems import assert_problem  # noqa: F401
