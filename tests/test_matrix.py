"""Real-world inputs through the recipes they matter for, each a real job through the bus.

The corpus (``tests/support/corpus.py``) is made by the bundled ffmpeg, every item checked to
carry its property; the expected outcome of every recipe x item is one table
(``tests/support/matrix.py``, mirrored in ``docs/media.md``). Here every item runs through the
recipes its property matters for (``MATTERS``), several jobs at once against one runtime;
``make matrix`` runs every cell and writes ``loadtests/reports/matrix.md``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from functions.registry import FUNCTIONS
from shared.errors import ErrorCode
from shared.media import Binaries
from shared.natsserver import NatsServer
from shared.settings import load_settings
from tests.support.corpus import ITEMS, Built, CorpusError, Probe, build_corpus, corpus_dir
from tests.support.matrix import (
    EXPECTED,
    MATTERS,
    OK,
    RECIPES,
    Cell,
    Outcome,
    cells,
    companions,
    mismatches,
    run_cells,
)
from tests.support.nats import running

pytestmark = pytest.mark.timeout(600)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "media.md"


@pytest.fixture(scope="module")
def corpus(binaries: Binaries) -> dict[str, Built]:
    return build_corpus(binaries, corpus_dir())


@pytest.fixture(scope="module")
async def outcomes(nats_server: NatsServer, binaries: Binaries, corpus: dict[str, Built],
                   tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[Cell, Outcome]]:
    """Every cell of ``MATTERS``, run once for the module: four jobs in flight."""
    root = tmp_path_factory.mktemp("matrix")
    (root / "work").mkdir()
    settings = load_settings(
        {}, nats_url=nats_server.url, namespace="matrix", data_dir=str(root / "data"),
        store="local", store_dir=str(root / "store"), work_dir=str(root / "work"),
        http_port=0, concurrency=2, fetch_timeout_s=0.5, allow_anonymous=True)
    extra = companions(binaries, root / "companions")
    async with running(settings, list(FUNCTIONS.values())) as rt:
        done = await run_cells(rt, corpus, cells(), extra, parallel=4)
    yield {o.cell: o for o in done}


def test_the_table_names_every_item_and_recipe_with_a_known_outcome() -> None:
    assert list(EXPECTED) == [i.name for i in ITEMS]
    codes = {c.value for c in ErrorCode}
    for item, row in EXPECTED.items():
        assert len(row) == len(RECIPES), item
        assert set(row) <= codes | {OK}, (item, row)
    assert set(MATTERS) == set(EXPECTED)
    assert all(set(r) <= set(RECIPES) and r for r in MATTERS.values())


def test_property_checks_fail_on_a_plain_clip(corpus: dict[str, Built],
                                              binaries: Binaries) -> None:
    """No check is vacuous: the plain control clip has none of the other properties."""
    plain = Probe(binaries, corpus["h264-aac"].path)
    passed = []
    for item in ITEMS:
        if item.public or item.name == "h264-aac":
            continue
        try:
            item.check(plain)
        except CorpusError:
            continue
        passed.append(item.name)
    assert passed == []


def test_docs_mirror_the_table() -> None:
    """docs/media.md's "Supported inputs" table says what EXPECTED says, cell for cell."""
    text = DOCS.read_text()
    rows: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        m = re.match(r"\| `([\w.-]+)` \|[^|]*\|(.*)\|\s*$", line)
        if m and m.group(1) in EXPECTED:
            rows[m.group(1)] = tuple(c.strip().strip("`") for c in m.group(2).split("|"))
    assert rows == EXPECTED


@pytest.mark.parametrize("item", [i.name for i in ITEMS])
def test_item_through_the_recipes_it_matters_for(
    outcomes: dict[Cell, Outcome], item: str
) -> None:
    mine = [o for c, o in outcomes.items() if c.item == item]
    assert {o.cell.recipe for o in mine} == set(MATTERS[item])
    assert mismatches(mine) == {}
