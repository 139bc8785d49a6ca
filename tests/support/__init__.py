"""Shared test support: tiny model folders (`weights`), synthetic images (`images`), Prometheus text
(`metrics`), problem+json checks (`problems`), reference answers (`answers`), the real datasets (`data`) and
the real processes the API and Redis-mode tests run against (`harness`). Importable as `support` from every
test folder (pytest puts tests/ on sys.path for tests/conftest.py)."""
