"""The Azurite fixture itself: a real Azure Blob endpoint that obstore reaches through its
standard environment configuration, as the az:// store will."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest


def test_obstore_reaches_azurite_through_the_fixture(az_store_url, azurite_server) -> None:
    import obstore
    from obstore.exceptions import AlreadyExistsError
    from obstore.store import AzureStore

    assert az_store_url.startswith("az://") and az_store_url.endswith("/weights")
    container = az_store_url.removeprefix("az://").split("/")[0]
    # Only the URL: account, key and endpoint come from the environment the fixture set.
    # (No repr(store): obstore 0.12 panics on it when the account is not in the config.)
    store = AzureStore.from_url(az_store_url)

    obstore.put(store, "blobs/a", b"hello world")
    assert obstore.get(store, "blobs/a").bytes() == b"hello world"
    assert obstore.get(store, "blobs/a", options={"range": (0, 5)}).bytes() == b"hello"
    assert obstore.head(store, "blobs/a")["size"] == 11

    # Conditional create (If-None-Match: *): the second writer loses, the first one's bytes stay.
    obstore.put(store, "blobs/b", b"first", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "blobs/b", b"second", mode="create")
    assert obstore.get(store, "blobs/b").bytes() == b"first"

    assert sorted(m["path"] for m in obstore.list(store, prefix="blobs").collect()) == ["blobs/a", "blobs/b"]

    # A SAS URL signed with the account key, fetched by a plain HTTP client.
    url = obstore.sign(store, "GET", "blobs/a", timedelta(minutes=5))
    assert url.startswith(f"{azurite_server.endpoint}/devstoreaccount1/{container}/weights/blobs/a?")
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.content == b"hello world"
    r = httpx.get(url, headers={"Range": "bytes=6-10"}, timeout=10)
    assert r.status_code == 206 and r.content == b"world"

    # The prefix of az://CONTAINER/PREFIX is where the blobs really are.
    names = sorted(b.name for b in azurite_server.client().get_container_client(container).list_blobs())
    assert names == ["weights/blobs/a", "weights/blobs/b"]
