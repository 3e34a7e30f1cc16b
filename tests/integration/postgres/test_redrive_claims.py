"""A dead letter's redrive is claimed in the store while it is published: two redrives at
once send it once, and one that fails to publish records nothing (both backends)."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

import pytest

from store.core import Store

LETTERS = "portal.dead-letters"
TARGET = "portal.changes.citizen"


@pytest.fixture
def store(store_url: str) -> Store:
    created = Store(store_url)
    created.create_schema()
    return created


def _claim(
    store: Store, offset: int, topic_id: str = "id-1", earlier_before: datetime | None = None
) -> AbstractContextManager[bool]:
    return store.claim_redrive(
        LETTERS, 0, offset, "invalid_field", TARGET, topic_id, earlier_before=earlier_before
    )


def test_a_letter_is_claimed_once_and_a_failed_publish_records_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), _claim(store, 5) as claimed:
        assert claimed
        raise RuntimeError("the broker did not acknowledge it")
    assert store.redriven(LETTERS, "id-1") == {}  # rolled back: not re-driven
    with _claim(store, 5) as claimed:
        assert claimed
    with _claim(store, 5) as again:
        assert not again
    assert store.redriven(LETTERS, "id-1") == {(0, 5): None}
    store.close()


def test_a_second_redrive_at_once_waits_for_the_first_and_finds_it_claimed(
    store: Store,
) -> None:
    """The first holds its claim while it publishes; the second, begun meanwhile from a
    list read before the first recorded anything, does not send the letter again."""
    publishing, published = threading.Event(), threading.Event()
    second: list[bool] = []

    def first() -> None:
        with _claim(store, 7) as claimed:
            assert claimed
            publishing.set()
            published.wait(10)  # the broker's acknowledgement

    def other() -> None:
        publishing.wait(10)
        with _claim(store, 7) as claimed:
            second.append(claimed)

    threads = [threading.Thread(target=first), threading.Thread(target=other)]
    for thread in threads:
        thread.start()
    publishing.wait(10)
    threads[1].join(1.0)
    assert threads[1].is_alive()  # waits for the first's claim
    published.set()
    for thread in threads:
        thread.join(30)
    assert second == [False]
    store.close()


def test_a_row_without_the_topics_id_is_taken_over_only_when_older_than_the_letter(
    store: Store,
) -> None:
    """A redrive recorded without the topic's id stands for the letter at its place only
    if it was recorded after that letter failed (`portal_sync.ops.dlq`): an earlier
    topic's row at the same place is the new letter's to claim."""
    with _claim(store, 3, topic_id="") as claimed:
        assert claimed
    (recorded,) = store.redriven(LETTERS, "").values()
    assert recorded is not None
    with _claim(store, 3, topic_id="", earlier_before=recorded) as claimed:
        assert not claimed  # recorded at or after the letter failed: this letter's
    later = recorded + timedelta(seconds=1)
    with _claim(store, 3, topic_id="", earlier_before=later) as claimed:
        assert claimed  # an earlier topic's letter's: taken over
    assert store.redriven(LETTERS, "")[(0, 3)] > recorded  # type: ignore[operator]
    store.close()


def test_only_the_redrives_of_letters_the_topic_still_holds_are_read(store: Store) -> None:
    """A redrive read every row ever recorded (millions after a few years); those of
    letters the topic's retention removed are of no use to it."""
    for offset in (1, 5, 9):
        with _claim(store, offset) as claimed:
            assert claimed
    assert set(store.redriven(LETTERS, "id-1")) == {(0, 1), (0, 5), (0, 9)}
    assert set(store.redriven(LETTERS, "id-1", {0: 5})) == {(0, 5), (0, 9)}
    assert set(store.redriven(LETTERS, "id-1", {1: 7})) == {(0, 1), (0, 5), (0, 9)}
    store.close()
