"""Files: batch input files in, batch output and error files out (the OpenAI Files API)."""

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import OwnerDep, SessionDep, SettingsDep, StorageDep
from jobs import files
from jobs.schemas.batches import FileDeleted, FileList, FilePublic

router = APIRouter(prefix="/v1/files", tags=["files"])


def content_disposition(filename: str) -> str:
    """An attachment header for any name (RFC 6266): the exact name as UTF-8 in `filename*`
    (RFC 5987), and for clients that know only `filename`, a plain ASCII stand-in.

    Headers travel as Latin-1, so the raw name would fail for most of the world's scripts;
    in the stand-in, quotes, backslashes and control characters could end the parameter or the
    header early, and `%` could be read as an escape by clients that decode it."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.post("", response_model=FilePublic)
def upload_file(
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    owner: OwnerDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> FilePublic:
    """Upload a JSONL batch input file (`purpose=batch`); it is streamed to storage."""
    created = files.create_file(
        session,
        storage,
        owner,
        file.filename or "upload.jsonl",
        purpose,
        file.file,
        settings.max_file_bytes,
        settings.max_file_lines,
    )
    return FilePublic.of(created)


@router.get("", response_model=FileList)
def list_files(session: SessionDep, owner: OwnerDep, purpose: str | None = None) -> FileList:
    """Your files, newest first."""
    return FileList(data=[FilePublic.of(f) for f in files.list_files(session, owner, purpose)])


@router.get("/{file_id}", response_model=FilePublic)
def get_file(file_id: str, session: SessionDep, owner: OwnerDep) -> FilePublic:
    """One file's details."""
    return FilePublic.of(files.get_file(session, owner, file_id))


@router.get("/{file_id}/content")
def get_file_content(
    file_id: str, session: SessionDep, owner: OwnerDep, storage: StorageDep
) -> StreamingResponse:
    """A file's contents, streamed."""
    file = files.get_file(session, owner, file_id)
    return StreamingResponse(
        files.open_content(storage, file),
        media_type="application/octet-stream",
        headers={"Content-Disposition": content_disposition(file.filename)},
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(
    file_id: str, session: SessionDep, owner: OwnerDep, storage: StorageDep
) -> FileDeleted:
    """Delete a file and its contents."""
    files.delete_file(session, storage, files.get_file(session, owner, file_id))
    return FileDeleted(id=file_id)
