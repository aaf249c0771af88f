import os

import pytest

from tests.annotate.helpers import browser_available, make_driver


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    """One headless Chromium for the session. Without one the browser tests are skipped,
    except where WESTAR_REQUIRE_BROWSER=1 (CI installs it), where that is a failure."""
    reason = browser_available()
    if reason:
        if os.environ.get("WESTAR_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests required but cannot run: {reason}")
        pytest.skip(reason)
    drv = make_driver(tmp_path_factory.mktemp("chromium-profile"))
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()
