"""LoRA upload over HTTP: real PEFT adapters, and each kind of malformed upload refused."""

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from jobs import service
from jobs.batches import InvalidLine, LineChecker, ValidLine, owner_adapters
from jobs.db import session_scope
from jobs.errors import InvalidParameter
from jobs.registry import resolve_model
from jobs.schemas.openai import CHAT_ENDPOINT, BatchLine
from jobs.settings import Settings
from tests.adapters import (
    edited_config,
    edited_weights,
    files,
    make_adapter,
    make_adapter_for_model,
    make_adapter_for_shape,
    pickled_weights,
)


@pytest.fixture(scope="module")
def adapter(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(models_dir / "tiny-random-mistral", tmp_path_factory.mktemp("lora"))


def upload(
    client: TestClient,
    headers: dict[str, str],
    name: str,
    parts: dict[str, Any],
    base_model: str = "tiny-random-mistral",
) -> Any:
    return client.post(
        "/v1/loras", data={"name": name, "base_model": base_model}, files=parts, headers=headers
    )


def test_upload_list_show_delete(
    client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    adapter: Path,
    api_settings: Settings,
) -> None:
    created = upload(client, alice, "my-style", files(adapter))
    assert created.status_code == 201, created.text
    lora = created.json()
    assert lora["id"].startswith("lora_") and lora["rank"] == 4
    assert lora["target_modules"] == ["q_proj", "v_proj"]
    assert len(lora["sha256"]) == 64
    storage_root = Path(api_settings.storage_url.removeprefix("file://"))
    stored = storage_root / "loras" / lora["id"] / "adapter_model.safetensors"
    assert stored.read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()

    assert client.get(f"/v1/loras/{lora['id']}", headers=alice).json()["name"] == "my-style"
    assert client.get("/v1/loras/my-style", headers=alice).json()["id"] == lora["id"]
    assert [item["id"] for item in client.get("/v1/loras", headers=alice).json()["data"]] == [
        lora["id"]
    ]
    assert client.get(f"/v1/loras/{lora['id']}", headers=bob).status_code == 404
    assert client.delete(f"/v1/loras/{lora['id']}", headers=bob).status_code == 404

    assert client.delete(f"/v1/loras/{lora['id']}", headers=alice).status_code == 204
    assert client.get(f"/v1/loras/{lora['id']}", headers=alice).status_code == 404
    assert not stored.exists()


def test_a_duplicate_name_is_422(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], adapter: Path
) -> None:
    assert upload(client, alice, "twice", files(adapter)).status_code == 201
    again = upload(client, alice, "twice", files(adapter))
    assert again.status_code == 422 and again.json()["error"]["param"] == "name"
    assert upload(client, bob, "twice", files(adapter)).status_code == 201  # another owner


REFUSALS = [
    (
        "pickled weights",
        lambda a: {"adapter_model.safetensors": pickled_weights(a)},
        "adapter_model.safetensors",
    ),
    (
        "not a LoRA config",
        lambda a: {"adapter_config.json": edited_config(a, peft_type="PREFIX_TUNING")},
        "adapter_config.json",
    ),
    ("config not JSON", lambda a: {"adapter_config.json": b"{not json"}, "adapter_config.json"),
    (
        "rank over the limit",
        lambda a: {"adapter_config.json": edited_config(a, r=64)},
        "adapter_config.json.r",
    ),
    (
        "unknown target module",
        lambda a: {
            "adapter_config.json": edited_config(a, target_modules=["q_proj", "v_proj", "foo_proj"])
        },
        "adapter_config.json.target_modules",
    ),
    (
        "an initialisation that rewrites the base weights",
        lambda a: {"adapter_config.json": edited_config(a, init_lora_weights="pissa")},
        "adapter_config.json.init_lora_weights",
    ),
    (
        "layer replication",
        lambda a: {"adapter_config.json": edited_config(a, layer_replication=[[0, 2], [1, 2]])},
        "adapter_config.json.layer_replication",
    ),
    (
        "a rank pattern",
        lambda a: {"adapter_config.json": edited_config(a, rank_pattern={"v_proj": 8})},
        "adapter_config.json.rank_pattern",
    ),
    (
        "an A matrix without its B",
        lambda a: {"adapter_model.safetensors": edited_weights(a, lambda k: "lora_B" not in k)},
        "adapter_model.safetensors",
    ),
    (
        "a projection under the wrong parent",
        lambda a: {
            "adapter_model.safetensors": edited_weights(
                a, lambda k: True, lambda k: k.replace("self_attn", "mlp")
            )
        },
        "adapter_model.safetensors",
    ),
    (
        "rank that does not match the tensors",
        lambda a: {"adapter_config.json": edited_config(a, r=8)},
        "adapter_model.safetensors",
    ),
]


@pytest.mark.parametrize(("what", "change", "param"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_malformed_uploads_are_422_naming_the_part(
    client: TestClient, alice: dict[str, str], adapter: Path, what: str, change: Any, param: str
) -> None:
    response = upload(client, alice, "bad", files(adapter, **change(adapter)))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def test_shapes_of_another_model_are_422(
    client: TestClient, alice: dict[str, str], tmp_path: Path
) -> None:
    other = make_adapter_for_shape(tmp_path / "wide", hidden_size=128)
    response = upload(client, alice, "wide", files(other))
    assert response.status_code == 422
    assert "does not fit" in response.json()["error"]["message"]


def test_a_model_that_takes_no_adapters_is_422(
    client: TestClient, alice: dict[str, str], adapter: Path
) -> None:
    response = upload(
        client, alice, "awq", files(adapter), base_model="mistral-7b-instruct-v0.1-awq"
    )
    assert response.status_code == 422 and response.json()["error"]["param"] == "base_model"


def test_an_adapter_over_the_size_limit_is_refused(
    alice: dict[str, str], adapter: Path, api_settings: Settings
) -> None:
    from api.app import create_app

    small = api_settings.model_copy(update={"max_lora_bytes": 1000})
    with TestClient(create_app(small), raise_server_exceptions=False) as client:
        response = upload(client, alice, "big", files(adapter))
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "adapter_model.safetensors"


def job(client: TestClient, headers: dict[str, str], lora: str, **extra: Any) -> Any:
    body = {"prompt": "Hello", "max_tokens": 4, "lora": lora, **extra}
    return client.post("/v1/jobs", json=body, headers=headers)


def test_a_job_names_its_adapter_by_name_or_id(
    client: TestClient, alice: dict[str, str], adapter: Path
) -> None:
    lora = upload(client, alice, "for-jobs", files(adapter)).json()
    by_name = job(client, alice, "for-jobs")
    assert by_name.status_code == 202, by_name.text
    assert by_name.json()["lora"] == "for-jobs" and by_name.json()["lora_id"] == lora["id"]
    by_id = job(client, alice, lora["id"])
    assert by_id.status_code == 202 and by_id.json()["lora_id"] == lora["id"]


def test_a_job_cannot_name_another_owners_adapter(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], adapter: Path
) -> None:
    lora = upload(client, alice, "alices-own", files(adapter)).json()
    for reference in ("alices-own", lora["id"]):
        response = job(client, bob, reference)
        assert response.status_code == 422
        assert response.json()["error"]["param"] == "lora"


def test_a_job_cannot_name_an_adapter_of_another_model(
    client: TestClient, alice: dict[str, str], tmp_path: Path
) -> None:
    v01 = resolve_model("mistral-7b-instruct-v0.1")
    made = upload(
        client, alice, "for-v01", files(make_adapter_for_model(tmp_path / "v01", v01)), v01.name
    )
    assert made.status_code == 201, made.text
    response = job(client, alice, "for-v01")  # the default model here is the tiny one
    assert response.status_code == 422 and response.json()["error"]["param"] == "lora"
    assert "mistral-7b-instruct-v0.1" in response.json()["error"]["message"]
    assert job(client, alice, "for-v01", model=v01.name).status_code == 202


def test_an_openai_request_names_its_adapter_too(
    client: TestClient, alice: dict[str, str], adapter: Path, api_settings: Settings
) -> None:
    lora = upload(client, alice, "openai-style", files(adapter)).json()
    line = BatchLine.model_validate(
        {
            "custom_id": "1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny-random-mistral",
                "messages": [{"role": "user", "content": "hi"}],
                "lora": "openai-style",
            },
        }
    )
    prepared = service.prepare_openai(line.parsed_body(), api_settings)
    with session_scope(api_settings.database_url) as session:
        assert service.adapter_id_for(session, "alice", prepared) == lora["id"]
        with pytest.raises(InvalidParameter) as refused:
            service.adapter_id_for(session, "bob", prepared)
        # A batch file's line is checked the same way, for the batch's owner.
        raw = line.model_dump_json().encode()
        for owner, expected in (("alice", lora["id"]), ("bob", None)):
            checker = LineChecker(CHAT_ENDPOINT, api_settings, owner_adapters(session, owner))
            checked = checker.check(1, raw)
            if expected is None:
                assert isinstance(checked, InvalidLine) and checked.param == "body.lora"
            else:
                assert isinstance(checked, ValidLine) and checked.lora_id == expected
    assert refused.value.param == "lora"
