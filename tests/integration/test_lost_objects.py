"""Objects lost from storage behind the database's back: the rows that name them still read,
and say what is gone, on S3 and on a local folder alike."""

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from jobs import files
from jobs.settings import Settings
from jobs.storage import Storage
from tests.integration.stored_results import succeeded_job


@pytest.fixture(scope="module", params=["s3", "folder"])
def lost(
    request: pytest.FixtureRequest, api_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Settings]]:
    if request.param == "s3":
        s3_url = request.getfixturevalue("s3_url")
        update = {"storage_url": "s3://mbatch-test/lost", "s3_endpoint_url": s3_url}
    else:
        update = {"storage_url": f"file://{tmp_path_factory.mktemp('lost')}"}
    settings = api_settings.model_copy(update=update)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, settings


def storage_of(client: TestClient) -> Storage:
    return client.app.state.storage  # type: ignore[attr-defined,no-any-return]


def test_a_job_whose_result_object_is_gone_answers_without_its_result(
    lost: tuple[TestClient, Settings], alice: dict[str, str]
) -> None:
    client, settings = lost
    job_id, key = succeeded_job(settings, storage_of(client), "kept in storage")
    before = client.get(f"/v1/jobs/{job_id}", headers=alice)
    assert before.status_code == 200 and before.json()["result"] == {"response": "kept in storage"}

    storage_of(client).delete(key)
    after = client.get(f"/v1/jobs/{job_id}", headers=alice)
    assert after.status_code == 200, after.text
    job = after.json()
    assert job["status"] == "succeeded" and job["result"] is None
    assert job["error"]["code"] == "result_unavailable" and job["error"]["message"]
    assert job["usage"] == before.json()["usage"] and job["cost"] == before.json()["cost"]


def test_the_content_of_a_file_whose_object_is_gone_is_a_json_error_before_any_byte(
    lost: tuple[TestClient, Settings], alice: dict[str, str]
) -> None:
    client, _ = lost
    made = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", b'{"a": 1}\n')},
        data={"purpose": "batch"},
        headers=alice,
    )
    assert made.status_code == 200, made.text
    file_id = made.json()["id"]

    storage_of(client).delete(files.storage_key(file_id))
    content = client.get(f"/v1/files/{file_id}/content", headers=alice)
    assert content.status_code == 410, (content.status_code, content.content)
    assert content.headers["content-type"] == "application/json"
    assert content.json()["error"]["code"] == "file_content_unavailable"
    assert content.json()["error"]["param"] == "file_id"
    # The file itself is still there to be seen and deleted.
    assert client.get(f"/v1/files/{file_id}", headers=alice).status_code == 200
    assert client.delete(f"/v1/files/{file_id}", headers=alice).status_code == 200
