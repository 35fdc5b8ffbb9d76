"""The dashboard's dead-letter triage, in the real headless Chromium (see test_dashboard.py).

Three poison submits of two shapes become dead letters in two groups; the page lists the
groups with their counts, and its "Replay group" button replays the larger group's entries,
each exactly once: the originals leave the DLQ, and (still poison) each comes back once as
a new entry that names the one it replays.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared import dlq
from shared.dlqgroups import list_groups
from tests.support.waiting import eventually
from tests.test_dashboard import (  # noqa: F401  (browser, chromium: fixtures used by name)
    POISON_SUBMIT,
    Stack,
    _stack,
    _waiter,
    browser,
    chromium,
)

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
async def triage_stack(make_settings, http_port) -> AsyncIterator[Stack]:  # type: ignore[no-untyped-def]
    """Gateway and conductor, open access (admin): poison submits become dead letters."""
    async for s in _stack(make_settings(http_port=http_port, allow_anonymous=True),
                          ["gateway", "conductor"]):
        yield s


def _replay_the_larger_group(driver: Any, base_url: str, group: str) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    wait = _waiter(driver, 30)
    driver.get(f"{base_url}/ui/#dlq")
    rows = "#dlq-groups-body tr"
    counts = wait.until(lambda d: (lambda c: c if len(c) == 2 else None)(d.execute_script(
        "return Object.fromEntries([...document.querySelectorAll(arguments[0])]"
        ".map(r => [r.dataset.group, r.querySelector('.count').textContent]))", rows)))
    assert counts[group] == "2", counts
    row = f'{rows}[data-group="{group}"]'
    assert driver.find_element(By.CSS_SELECTOR, f"{row} th").text == "conductor"
    driver.find_element(By.CSS_SELECTOR, f"{row} button").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "dlq-groups-note"),
                                                f"{group}: replayed 2, covered 0"))
    note: str = driver.find_element(By.ID, "dlq-groups-note").text
    return note


async def test_the_page_lists_groups_and_replays_one(
    triage_stack: Stack, request: pytest.FixtureRequest
) -> None:
    driver = request.getfixturevalue("browser")  # test_dashboard's Chromium (skips without)
    services = triage_stack.services
    for body in (POISON_SUBMIT, POISON_SUBMIT, b"not json at all"):
        await services.bus.js.publish(services.names.submit, body)

    async def three() -> bool:
        return len((await dlq.list_entries(services)).entries) == 3

    await eventually(three, what="three dead letters")
    groups = (await list_groups(services)).groups
    assert [g.count for g in groups] == [2, 1]
    group = groups[0].group
    originals = {e.seq for e in (await dlq.list_entries(services)).entries
                 if e.error.message == groups[0].example.error.message}
    assert len(originals) == 2

    note = await asyncio.to_thread(_replay_the_larger_group, driver,
                                   triage_stack.settings.base_url, group)
    assert note.endswith("kept 0."), note

    async def back_once_each() -> bool:
        return len((await dlq.list_entries(services)).entries) == 3

    await eventually(back_once_each, what="the replayed poison back in the DLQ")
    entries = (await dlq.list_entries(services)).entries
    assert not originals & {e.seq for e in entries}  # each original replayed and gone
    replays = [(await dlq.get_entry(services, e.seq)).headers.get("jetcut-replay-of")
               for e in entries]
    assert sorted(r for r in replays if r) == sorted(str(s) for s in originals)
