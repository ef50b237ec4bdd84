from tests.integration.conftest import small_corpus  # noqa: F401 - the shared session-scoped corpus fixture
