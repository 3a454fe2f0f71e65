"""LoRA adapters: upload, list, show, delete."""

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status

from api.deps import OwnerDep, SessionDep, SettingsDep, StorageDep
from jobs import loras
from jobs.schemas.loras import LoraList, LoraPublic

router = APIRouter(prefix="/v1/loras", tags=["loras"])


# A plain function, so that FastAPI runs it in a worker thread: checking, hashing and storing
# hundreds of megabytes must not hold the event loop, and every other request, meanwhile.
@router.post("", status_code=status.HTTP_201_CREATED, response_model=LoraPublic)
def upload_lora(
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    owner: OwnerDep,
    name: Annotated[str, Form()],
    base_model: Annotated[str, Form()],
    adapter_config: Annotated[UploadFile, File(alias=loras.CONFIG_FIELD)],
    adapter_model: Annotated[UploadFile, File(alias=loras.WEIGHTS_FIELD)],
) -> LoraPublic:
    """Upload a PEFT LoRA adapter; it is checked against its base model before it is kept."""
    adapter = loras.create_adapter(
        session,
        storage,
        owner,
        name,
        base_model,
        adapter_config.file.read(loras.MAX_CONFIG_BYTES + 1),
        adapter_model.file,
        settings.max_lora_rank,
        settings.max_lora_bytes,
    )
    return LoraPublic.of(adapter)


@router.get("", response_model=LoraList)
def list_loras(session: SessionDep, owner: OwnerDep) -> LoraList:
    """Your adapters, oldest first."""
    return LoraList(data=[LoraPublic.of(a) for a in loras.list_adapters(session, owner)])


@router.get("/{lora_id}", response_model=LoraPublic)
def get_lora(lora_id: str, session: SessionDep, owner: OwnerDep) -> LoraPublic:
    """One adapter, by id or name."""
    return LoraPublic.of(loras.find_adapter(session, owner, lora_id))


@router.delete("/{lora_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_lora(lora_id: str, session: SessionDep, owner: OwnerDep, storage: StorageDep) -> None:
    """Delete an adapter and its files."""
    loras.delete_adapter(session, storage, loras.find_adapter(session, owner, lora_id))
