"""Files: batch input files uploaded by users, and the output and error files of batches.

Uploads go to object storage in pieces; nothing here holds a whole file in memory.
"""

import itertools
import secrets
from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from jobs.errors import InvalidParameter, MbatchError, NotFound
from jobs.models import FileObject
from jobs.storage import Storage

INPUT_PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"
CHUNK_BYTES = 1024 * 1024


class ContentUnavailable(MbatchError):
    """The file is on record but its stored contents are gone. Gone for good, unlike an outage
    (503), and unlike a wrong id (404): the file itself still reads and can be deleted."""

    code = "file_content_unavailable"
    status_code = 410


def storage_key(file_id: str) -> str:
    return f"files/{file_id}.jsonl"


def count_lines(stream: BinaryIO) -> tuple[int, int]:
    """Bytes and lines of a seekable stream (a last line without a newline counts), read in
    pieces; the stream is left at its start."""
    size = lines = 0
    last = b"\n"
    stream.seek(0)
    while chunk := stream.read(CHUNK_BYTES):
        size += len(chunk)
        lines += chunk.count(b"\n")
        last = chunk[-1:]
    stream.seek(0)
    return size, lines + (last != b"\n")


def read_lines(stream: BinaryIO, max_line_bytes: int) -> Iterator[bytes | None]:
    """The stream's lines without their newlines, read in pieces; None for a line longer than
    `max_line_bytes`, which is skipped rather than held."""
    pending = bytearray()
    too_long = False
    while chunk := stream.read(CHUNK_BYTES):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if too_long or len(pending) + end - start > max_line_bytes:
                yield None
            else:
                pending += chunk[start:end]
                yield bytes(pending)
            pending.clear()
            too_long = False
            start = end + 1
        if not too_long:
            pending += chunk[start:]
            if len(pending) > max_line_bytes:
                pending.clear()
                too_long = True
    if too_long:
        yield None
    elif pending:
        yield bytes(pending)


def create_file(
    session: Session,
    storage: Storage,
    owner: str,
    filename: str,
    purpose: str,
    stream: BinaryIO,
    max_bytes: int,
    max_lines: int,
) -> FileObject:
    """Keep an uploaded batch input file; refused above the size and line limits."""
    if purpose != INPUT_PURPOSE:
        raise InvalidParameter(
            "purpose", purpose, f'files are uploaded for purpose "{INPUT_PURPOSE}"'
        )
    size, lines = count_lines(stream)
    if size > max_bytes:
        raise InvalidParameter("file", f"<{size} bytes>", f"a file is at most {max_bytes} bytes")
    if lines > max_lines:
        raise InvalidParameter("file", f"<{lines} lines>", f"a file is at most {max_lines} lines")
    if size == 0:
        raise InvalidParameter("file", "<empty>", "the file is empty")
    if "\x00" in filename:
        # Postgres text cannot hold NUL; nothing else about a name is refused.
        raise InvalidParameter("file", filename, "the file name contains a NUL character")
    file = FileObject(
        id="file-" + secrets.token_hex(12),
        owner=owner,
        purpose=purpose,
        filename=filename[:512] or "upload.jsonl",
        bytes=size,
        lines=lines,
        storage_key="",
    )
    file.storage_key = storage_key(file.id)
    # The object first: a row never names contents that are not there. If the unit of work
    # then rolls back, the object is left unnamed, which costs storage and nothing else.
    storage.put_stream(file.storage_key, stream)
    session.add(file)
    session.flush()
    return file


def save_output(
    session: Session,
    storage: Storage,
    owner: str,
    file_id: str,
    filename: str,
    stream: BinaryIO,
    lines: int,
) -> FileObject:
    """Keep a file a batch wrote (`lines` lines, counted as it was written; the stream at its
    start); its id is fixed by the batch, so writing it again replaces it."""
    size = stream.seek(0, 2)
    stream.seek(0)
    storage.put_stream(storage_key(file_id), stream)
    session.execute(delete(FileObject).where(FileObject.id == file_id))
    file = FileObject(
        id=file_id,
        owner=owner,
        purpose=OUTPUT_PURPOSE,
        filename=filename,
        bytes=size,
        lines=lines,
        storage_key=storage_key(file_id),
    )
    session.add(file)
    return file


def get_file(session: Session, owner: str, file_id: str) -> FileObject:
    file = session.scalar(
        select(FileObject).where(FileObject.id == file_id, FileObject.owner == owner)
    )
    if file is None:
        raise NotFound(f"no file {file_id}", param="file_id")
    return file


def list_files(session: Session, owner: str, purpose: str | None = None) -> list[FileObject]:
    query = select(FileObject).where(FileObject.owner == owner)
    if purpose is not None:
        query = query.where(FileObject.purpose == purpose)
    return list(session.scalars(query.order_by(FileObject.created_at.desc())))


def open_stored(storage: Storage, file: FileObject, param: str = "file_id") -> BinaryIO:
    """A readable stream of the file's contents; ContentUnavailable if they are gone."""
    try:
        return storage.open(file.storage_key)
    except KeyError:
        raise ContentUnavailable(
            f"the contents of file {file.id} are no longer in storage", param=param
        ) from None


def open_content(storage: Storage, file: FileObject) -> Iterator[bytes]:
    """The file's contents in pieces, the first already read: a missing object or a storage
    that is down fails here, while an error can still be the whole answer, rather than after
    a streamed response has begun."""
    chunks = _chunks(open_stored(storage, file))
    first = next(chunks, b"")
    return itertools.chain((first,), chunks)


def _chunks(body: BinaryIO) -> Iterator[bytes]:
    # Entered by the first read, so that the body is closed however the iteration ends,
    # a client that goes away mid-stream included.
    with body:
        while chunk := body.read(CHUNK_BYTES):
            yield chunk


def delete_file(session: Session, storage: Storage, file: FileObject) -> None:
    # The row's delete is flushed first and committed by the unit of work once the object is
    # gone: a storage outage leaves both (the unit of work rolls back), and a commit that
    # fails after it leaves a file without contents (410), that a retry deletes; never an
    # object that no row names.
    session.delete(file)
    session.flush()
    storage.delete(file.storage_key)
