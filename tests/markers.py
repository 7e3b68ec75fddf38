"""Marks every test ``unit``, ``integration`` or ``e2e`` from the fixtures it uses (loaded by conftest).

So ``scripts/test.sh -m unit`` is the quick loop and new tests are marked without anyone remembering
to: a test that needs a real Label Studio, the browser or docker-compose is ``e2e``; one that loads
models (the tiny model cache or a model built in the test module) is ``integration``; the rest are
``unit``. A test may carry one of the markers itself, which then wins.
"""

from __future__ import annotations

import pytest

KINDS = ("unit", "integration", "e2e")
E2E_FIXTURES = frozenset({"label_studio", "browser", "compose"})
MODEL_FIXTURES = frozenset({"tiny_cache", "engine", "quick_engine", "reduced_engine", "reference_engine",
                            "tiny_sam", "reference_sam", "reference_dino", "two_dinos", "stock_features"})


def kind_of(item: pytest.Item) -> str:
    """The marker ``item`` gets: its own if it has one, else what its fixtures say."""
    own = [kind for kind in KINDS if item.get_closest_marker(kind) is not None]
    if own:
        return own[0]
    fixtures = set(getattr(item, "fixturenames", ()))
    if fixtures & E2E_FIXTURES:
        return "e2e"
    if fixtures & MODEL_FIXTURES:
        return "integration"
    return "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = kind_of(item)
        if item.get_closest_marker(kind) is None:
            item.add_marker(kind)
