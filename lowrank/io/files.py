"""Files on disk, safely: safetensors only, outputs atomic and never onto an input.

Reading goes through `safetensors.safe_open`, which checks the header (JSON, dtypes, shapes
against byte offsets, offsets against the file size) before any tensor is touched; its
errors become `FileFormatError` naming the file. Pickle files (`torch.save`) are refused,
since unpickling runs code. Writing stages every output as a temporary file in its
destination folder and renames it into place with `os.replace` only once everything has
been written (`Staging`): a failure while writing leaves no output behind, and a failure
while renaming puts back what was there before. `write_safetensors` writes the
safetensors layout one tensor at a time, so an output never has to be in memory whole.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import shutil
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from .._checks import require_names, require_path, require_values
from .._termination import raise_if_terminated
from ..errors import FileFormatError, LowRankError, OutputPathError, ShapeError

PathLike = str | os.PathLike[str]

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
# torch.save writes a zip archive; older torch and plain pickle start with the PROTO opcode.
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
# A safetensors file starts with its header's length (8 bytes) and the header's "{".
_HEADER_START = 8

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
    **({torch.float8_e8m0fnu: "F8_E8M0"} if hasattr(torch, "float8_e8m0fnu") else {}),  # 2.7
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
CODE_DTYPES = frozenset(dtype for dtype, name in DTYPE_NAMES.items() if name == "F8_E8M0")
"""Floating dtypes whose entries are codes, not values a weight could take: `F8_E8M0`
(unsigned powers of two, the scales of microscaling formats). Tensors of them are read and
copied byte for byte, never merged into, converted or compared as numbers."""


def holds_weights(dtype: torch.dtype) -> bool:
    """Whether a tensor of `dtype` holds numbers a weight can be merged into or compared
    by value: a floating dtype, not one of `CODE_DTYPES`."""
    return dtype.is_floating_point and dtype not in CODE_DTYPES


def pickle_refusal(path: Path) -> FileFormatError:
    """The error for a pickle file: what it is, why it is refused, and how to convert it."""
    target = path.with_suffix(".safetensors")
    if target == path:  # a pickle named .safetensors: the command must not write over it
        target = path.with_name(f"{path.stem}-converted.safetensors")
    return FileFormatError(
        f"{path} is a pickle (torch.save) file; lowrank reads safetensors only, because loading "
        "a pickle can run arbitrary code. If you trust the file, convert it once with: python -c "
        f"\"import torch; from safetensors.torch import save_file; save_file(torch.load('{path}', "
        f"weights_only=True), '{target}')\""
    )


def require_safetensors(path: PathLike) -> Path:
    """`path` as a `Path` to an existing safetensors file, one the file system can look up
    (`require_reachable`); pickles and others are refused. Every safetensors input is
    checked here, once, before it is read (a caller that asks whether a path is a folder
    first uses `os.path.isdir`, False for a path that cannot be looked up)."""
    path = require_reachable(Path(path), FileFormatError, "read")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else (
            "is not a regular file" if path.exists() else "does not exist")
        raise FileFormatError(f"{path} {what}; expected a .safetensors file")
    try:
        with path.open("rb") as handle:
            head = handle.read(_HEADER_START + 1)
    except OSError as err:
        raise FileFormatError(f"cannot read {path}: {err.strerror}") from None
    if head[_HEADER_START:] != b"{" and head.startswith(_PICKLE_MAGIC):
        raise pickle_refusal(path)
    # a safetensors file starts with its header's length, a little-endian u64 whose high
    # bytes are 0; text in them is some other file, and a '{' first is a JSON one
    if head[:1] == b"{" and any(head[1:_HEADER_START]):
        raise FileFormatError(
            f"{path} is a JSON file, not a .safetensors file; give the .safetensors file, or "
            "the folder that holds it"
        )
    return path


@contextmanager
def open_safetensors(path: PathLike) -> Iterator[Any]:
    """`safe_open(path)` on CPU, its header validated; any failure is a `FileFormatError`."""
    path = require_safetensors(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(f"{path} is not a valid safetensors file: {err}") from None
    with handle:
        try:
            yield handle
        except SafetensorError as err:
            raise FileFormatError(f"{path}: cannot read tensor data: {err}") from None


def header(path: PathLike) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str]]:
    """`({key: (dtype, shape)}, metadata)` of a safetensors file, keys sorted (as
    `safe_open.keys()` lists them, whatever order the header or the data has). A key longer
    than `MAX_NAME_LENGTH` is a `FileFormatError` (`require_names`), before any regex matches
    it."""
    with open_safetensors(path) as handle:
        entries = {}
        names = handle.keys()
        require_names(path, names, FileFormatError)
        for key in names:
            view = handle.get_slice(key)
            name = view.get_dtype()
            if name not in DTYPES_BY_NAME:
                raise FileFormatError(
                    f"{path}: tensor {key!r} has dtype {name}, which lowrank does not read "
                    f"(it reads {', '.join(DTYPES_BY_NAME)})"
                )
            entries[key] = (DTYPES_BY_NAME[name], tuple(view.get_shape()))
        return entries, dict(handle.metadata() or {})


def data_offsets(
    path: PathLike, entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
) -> dict[str, int]:
    """`{key: offset}`: where the bytes of each tensor of `entries` (`header(path)`) start in
    the file (absolute). `safe_open` tells no offsets, so the header is read again, with
    plain reads, and checked against `entries`: the same keys, each spanning the bytes of its
    dtype and shape. A file that changed since (a header now longer than the file, or not
    JSON, or other tensors) is a `FileFormatError`, before anything of that size is read."""
    changed = f"{path} changed while it was being read"
    try:
        with Path(path).open("rb") as handle:
            size = int.from_bytes(handle.read(_HEADER_START), "little")
            room = os.fstat(handle.fileno()).st_size - _HEADER_START
            text = handle.read(size) if size <= room else None
    except OSError as err:
        raise FileFormatError(f"cannot read the header of {path}: {err.strerror}") from None
    if text is None:
        raise FileFormatError(f"{changed}: its header is now longer than the file")
    try:
        content = parse_json(text)
    except (ValueError, RecursionError):
        raise FileFormatError(f"{changed}: its header is no longer valid JSON") from None
    found = content if isinstance(content, dict) else {}
    spans = {k: v.get("data_offsets") if isinstance(v, dict) else None
             for k, v in found.items() if k != "__metadata__"}  # fmt: skip
    if set(spans) != set(entries):
        raise FileFormatError(f"{changed}: its header now lists other tensors")
    offsets = {}
    for key, (dtype, shape) in entries.items():
        span = spans[key]
        nbytes = math.prod(shape) * dtype.itemsize
        if not (
            isinstance(span, list)
            and len(span) == 2
            and all(type(end) is int and end >= 0 for end in span)
            and span[1] - span[0] == nbytes
        ):
            raise FileFormatError(
                f"{changed}: tensor {key!r} no longer spans the {nbytes} bytes of {dtype} "
                f"{shape} (data_offsets {span!r})"
            )
        offsets[key] = _HEADER_START + size + span[0]
    return offsets


def read_into(path: Path, tensor: torch.Tensor, offset: int) -> torch.Tensor:
    """Fill the contiguous CPU `tensor` with the bytes of `path` from `offset` (plain reads,
    no memory map, so the process holds `tensor` and nothing of the file); `FileFormatError`
    if the file ends early."""
    try:
        with path.open("rb", buffering=0) as handle:
            return _fill(handle, path, tensor, offset)
    except OSError as err:
        raise FileFormatError(f"cannot read {path}: {err.strerror}") from None


def _fill(handle: BinaryIO, path: Path, tensor: torch.Tensor, offset: int) -> torch.Tensor:
    """`read_into` from the open, unbuffered `handle` of `path`."""
    buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
    done = 0
    handle.seek(offset)
    while done < len(buffer):
        got = handle.readinto(buffer[done:])
        if not got:
            break
        done += got
    if done != len(buffer):
        raise FileFormatError(
            f"{path} ends {len(buffer) - done} bytes early: it changed after its header was read"
        )
    return tensor


class Scratch:
    """Flat byte buffers reused from one block of a stream to the next: two per role, taken
    in turn.

    A stream that allocated each 16 MiB block afresh would have the kernel zero-fill new
    pages every block (when the allocator maps large blocks) or keep freed blocks in the
    heap (when it does not: glibc raises its mapping threshold to the largest block freed);
    reused buffers cost neither. Two per role let `write_safetensors` write one block while
    the next is computed: a tensor `take` returns is overwritten by the second `take` of
    its role after it, so a stream that takes each role once per block may yield it.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._turn: dict[str, int] = {}

    def take(self, role: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor of `shape` and `dtype` in the next of `role`'s
        two buffers."""
        turn = self._turn[role] = 1 - self._turn.get(role, 1)
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get((role, turn))
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            self._buffers[role, turn] = buffer
        return buffer[:nbytes].view(dtype).view(tuple(shape))


def load_tensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a (small) safetensors file, keys sorted, and its metadata. Each is
    read into memory of its own with plain reads (`data_offsets`, `read_into`), never left
    mapped from the file: a tensor mapped from a file would change with the file, and
    reading it once the file is cut short would end the process (SIGBUS)."""
    entries, metadata = header(path)
    offsets = data_offsets(path, entries)
    path = Path(path)
    try:
        with path.open("rb", buffering=0) as handle:
            tensors = {
                key: _fill(handle, path, torch.empty(shape, dtype=dtype), offsets[key])
                for key, (dtype, shape) in entries.items()
            }
    except OSError as err:
        raise FileFormatError(f"cannot read {path}: {err.strerror}") from None
    return tensors, metadata


def parse_json(text: str | bytes) -> Any:
    """The JSON value of `text`. `ValueError` where it is not JSON, or holds an integer of
    more than `INT_DIGITS` digits, refused before it is converted (converting one takes
    time quadratic in its digits, whatever `sys.set_int_max_str_digits` allows: the
    `lowrank` command lifts that limit to print counts whole); `RecursionError` where it is
    nested deeper than Python's parser goes."""
    return json.loads(text, parse_int=_bounded_int)


INT_DIGITS = 4300
"""The most digits a JSON integer of a file may have (Python's default limit on `int(str)`)."""


def _bounded_int(digits: str) -> int:
    """The JSON integer `digits`; `ValueError` for one of more than `INT_DIGITS` digits."""
    if len(digits.lstrip("-")) > INT_DIGITS:
        raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits, more than {INT_DIGITS}")
    return int(digits)


def config_at(path: str | os.PathLike[str]) -> dict | None:
    """The JSON object in the regular file at `path`, or None (for anything else there: a
    FIFO, whose opening blocks until a writer comes, or a device such as `/dev/zero`, which
    never ends, is not read)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        config = parse_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def read_json(
    path: Path, *, label: str = "", error: type[LowRankError] = FileFormatError
) -> Any:
    """The JSON value in `path` (UTF-8), or `error` naming it (after `label`, a command-line
    option say) if it cannot be looked up (`require_reachable`), is unreadable or is not
    JSON (a nesting too deep for Python's parser included)."""
    where = f"{label} {path}" if label else str(path)
    require_reachable(path, error, f"read {label}" if label else "read")
    if path.exists() and not (path.is_file() or path.is_dir()):  # a FIFO would block
        raise error(f"{where} is not a regular file; expected a JSON file")
    try:
        return parse_json(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise error(f"cannot read {where}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise error(f"{where} is not UTF-8 text: {err}") from None
    except (ValueError, RecursionError) as err:  # ValueError: also an integer too long to read
        raise error(f"{where} is not valid JSON: {err}") from None


def require_reachable(path: Path, error: type[LowRankError], verb: str) -> Path:
    """`path` once the file system can look it up, whether or not it exists; else `error`
    saying that `path` cannot be `verb` (read, written) and why: a NUL byte, a name too long,
    a loop of symbolic links, a folder on the way that cannot be searched. pathlib's checks
    (`exists`, `is_dir`, `resolve`) raise these as `OSError`, `ValueError` or
    `RuntimeError`, or take them for a missing file."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass  # a missing file, or one under a file: each reader and writer names these
    except ValueError as err:  # the file system's names cannot hold a NUL byte
        raise error(f"cannot {verb} {str(path)!r}: {err}") from None
    except OSError as err:
        raise error(f"cannot {verb} {path}: {err.strerror}") from None
    return path


def ends_in_separator(path: PathLike) -> bool:
    """Whether `path`, as given, ends in a path separator, which makes it a folder's path
    (pathlib drops it: `Path("x.safetensors/")` is `x.safetensors`)."""
    return os.fspath(path).endswith(tuple(sep for sep in (os.sep, os.altsep) if sep))


def output_path(out: PathLike, one_file: Callable[[Path], bool]) -> Path:
    """A writer's output argument `out` as a `Path`: `ArgumentError` unless it is a str or an
    `os.PathLike`, and `OutputPathError` naming it where it ends in a separator, which names
    a folder, but `one_file(path)` says that the writer writes one file there (pathlib drops
    the separator, so `x.safetensors/` would become the file `x.safetensors`). A writer whose
    output is a folder (a PEFT adapter, a sharded checkpoint) takes one."""
    path = require_path("out", out)
    if ends_in_separator(out) and one_file(path):
        text = os.fspath(out)
        raise OutputPathError(
            f"output {text} ends in {text[-1]!r}, which names a folder, but the output there "
            f"is one file: give {path}"
        )
    return path


def same_path(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file (hard links and symlinks included)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def require_outputs(
    outputs: Iterable[Path],
    inputs: Iterable[Path] = (),
    readings: Mapping[Path, str] | None = None,
) -> None:
    """Check every path a writer makes (`out` first) before it writes: `OutputPathError`
    where one cannot be looked up (`require_reachable`), names an input file, or names a
    path of `readings` (a path whose writing would change what an input reads as, though
    it is not read, such as the name that decides an adapter folder's format → what it
    would change: `store.adapter_readings`). The one check of outputs:
    `require_outside_folders`, `CheckpointWriter` and `Staging` take paths checked here."""
    inputs = list(inputs)
    for out in outputs:
        require_reachable(out, OutputPathError, "write")
        for source in inputs:
            if same_path(out, source):
                raise OutputPathError(
                    f"output {out} is the input {source}; write to a new path (inputs are never "
                    "overwritten)"
                )
        for path, changed in (readings or {}).items():
            if same_path(out, path):
                raise OutputPathError(
                    f"output {out} would change {changed}; write to another folder (inputs are "
                    "never changed)"
                )


def require_outside_folders(out: Path, checkpoints: Iterable[Path], what: str) -> None:
    """`OutputPathError` when `out` (`what` is written there) is, or names a `.safetensors`
    entry directly in, the folder a checkpoint of `checkpoints` was given as, or is the
    folder of a checkpoint file given alone in it (a model folder): such a folder opens as
    one checkpoint only while it holds a single `.safetensors` file (or an index), and the
    files written there would stop it opening. A file written beside a checkpoint file
    given as such is the caller's choice. `out` is checked (`require_outputs`), and so are
    `checkpoints` (read)."""
    for given in checkpoints:
        if given.is_dir():
            folder = given
            inside = same_path(out.parent, folder) and out.name.endswith(".safetensors")
        elif given.is_file() and [given] == list(given.parent.glob("*.safetensors")):
            folder, inside = given.parent, False
        else:
            continue
        if inside or same_path(out, folder):
            raise OutputPathError(
                f"output {out} would write {what} into {folder}, the folder of a checkpoint "
                "given as input, which then holds two .safetensors files and no longer opens "
                "as one checkpoint; write it elsewhere"
            )


_NAME_TRIES = 16


_NAME_BYTES = 255  # the longest file name Linux, macOS and Windows file systems take


def _new_name(final: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """A new hidden path `.<final's name>.<random><suffix>` beside `final`, made by
    `create(path)`; another random name while `create` finds one taken (`FileExistsError`).
    The name part is cut so that the whole stays within `_NAME_BYTES` (a final name near the
    limit is legal, its temporary name must be too)."""
    for _ in range(_NAME_TRIES):
        tail = f".{secrets.token_hex(6)}{suffix}"
        name = final.name
        while len(os.fsencode(f".{name}{tail}")) > _NAME_BYTES:
            name = name[:-1]
        path = final.with_name(f".{name}{tail}")
        try:
            create(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final.parent))


def _create_empty(path: Path) -> None:
    """Create the empty file `path`, which must not exist, as `open()` would: mode 0o666
    less the umask, which the kernel applies (the umask is never read or changed here)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _keep_old(final: Path) -> Path | None:
    """The file at `final` kept under a new hidden name beside it (None when there is none):
    a hard link, so `final` stays in place until it is replaced; on a filesystem without
    hard links, `final` itself moves there (and is missing until the rename that follows)."""
    if not os.path.lexists(final):
        return None
    try:
        return _new_name(final, ".old", lambda path: os.link(final, path, follow_symlinks=False))
    except (OSError, NotImplementedError):  # no hard links here, or no linking a symlink
        backup = _new_name(final, ".old", _create_empty)
        try:
            os.replace(final, backup)
        except OSError:
            backup.unlink(missing_ok=True)
            raise
        return backup


def _put_back(replaced: list[tuple[Path, Path | None]]) -> list[str]:
    """Undo the renames of a failed commit, last first: each replaced file back from its
    backup, each new file removed. Returns what could not be put back."""
    failures = []
    for final, backup in reversed(replaced):
        try:
            if backup is None:
                final.unlink(missing_ok=True)
            else:
                os.replace(backup, final)
                # a rename between two links of one file does nothing: drop the backup's name
                backup.unlink(missing_ok=True)
        except OSError as err:
            kept = f"its previous content is in {backup}" if backup else "a new file"
            failures.append(f"{final} ({kept}: {err.strerror})")
    return failures


def _mode_for(final: Path, new: int) -> int:
    """The permission bits of the file to be renamed onto `final`: those of the regular file
    there now (its read, write and execute bits for owner, group and others; no setuid,
    setgid or sticky bit), so that replacing it changes no one's access, else `new`."""
    try:
        found = os.stat(final)
    except FileNotFoundError:
        return new
    return found.st_mode & 0o777 if stat.S_ISREG(found.st_mode) else new


def _file_id(found: os.stat_result) -> tuple[int, int]:
    """`(device, inode)` of a file's `stat`: the same for every name of one file."""
    return found.st_dev, found.st_ino


class Staging:
    """Outputs written to temporary files beside their destinations, renamed on success.

    Use as a context manager: `path = staging.temp_for(final)` gives a fresh temporary
    path in `final`'s folder (created if missing), and `with staging.writing(final) as
    path:` does too, with an `OSError` while writing it (a full disk, a lost permission)
    raised as `OutputPathError` naming `final`. An exception in the block removes every
    temporary file, and any folder the staging created, so nothing is left behind.

    Leaving the block normally commits: each temporary file is flushed to disk and given the
    permission bits of the file it replaces, or those `open()` would give a new file (before
    any rename, so late write errors come first); unless the `lowrank` command was asked to
    end by a signal meanwhile (what the signal raised was swallowed on the way: it is raised
    again here, and the temporary files removed), each is then renamed onto its
    final path with `os.replace`, the file it replaces kept as a hard link until all are
    done (moved aside where the filesystem has no hard links). If a rename fails, the
    renames already done are undone from those links (new files removed) and
    `OutputPathError` says what failed, so the outputs are all new or all as before; only a
    failure of that undoing, or the process dying mid-commit, can leave some replaced, and
    the error then names what it left where. Files given to `remove_after` are removed once
    every output is in place, but not one that is then an output under another name (one
    differing in case only, on a case-insensitive file system), whose removal would delete
    that output.
    A path that cannot be looked up is an `OutputPathError`; writers check their outputs
    before anything is computed as well (`require_outputs`).
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path, int]] = []  # (temporary, final, mode if new)
        self._made: list[Path] = []
        self._obsolete: list[Path] = []

    def __enter__(self) -> Staging:
        return self

    def folder(self, path: Path) -> Path:
        """Create `path` (and missing parents) unless it exists; remember what was created.
        A `path` that cannot be looked up is an `OutputPathError` (`require_reachable`)."""
        require_reachable(path, OutputPathError, "write")
        missing = []
        for parent in (path, *path.parents):
            if parent.exists():
                break
            missing.append(parent)
        for folder in reversed(missing):  # one at a time, each remembered once made
            try:
                folder.mkdir()
            except FileExistsError:
                continue  # made meanwhile by another process: not ours to remove
            except OSError as err:
                raise OutputPathError(f"cannot create folder {path}: {err.strerror}") from None
            self._made.append(folder)
        if not path.is_dir():
            raise OutputPathError(f"{path} exists and is not a folder")
        return path

    def temp_for(self, final: Path) -> Path:
        """A new temporary file in `final`'s folder, renamed onto `final` at commit; a
        `final` that cannot be looked up is an `OutputPathError` (`require_reachable`)."""
        require_reachable(final, OutputPathError, "write")
        if final.is_dir():
            raise OutputPathError(f"output {final} is a folder; give a file path")
        if final.exists() and not final.is_file():  # a device, FIFO or socket: never replaced
            raise OutputPathError(f"output {final} exists and is not a regular file")
        folder = self.folder(final.parent)
        try:
            temp = _new_name(final, ".tmp", _create_empty)
            # the mode open() gives, set at commit unless `final` exists then: a writer may
            # replace the file with its own (one that writes a 0o600 file and renames it onto
            # this one)
            mode = stat.S_IMODE(temp.stat().st_mode)
        except OSError as err:
            raise OutputPathError(f"cannot write in {folder}: {err.strerror}") from None
        self._pending.append((temp, final, mode))
        return temp

    @contextmanager
    def writing(self, final: Path) -> Iterator[Path]:
        """`temp_for(final)`, with an `OSError` while writing it an `OutputPathError`."""
        temp = self.temp_for(final)
        try:
            yield temp
        except OSError as err:
            raise OutputPathError(f"cannot write {final}: {err.strerror or err}") from None

    def remove_after(self, path: Path) -> None:
        """Remove `path` once every output is in place (a file the outputs make obsolete); it
        stays if anything fails before, or if it is by then another name of an output."""
        self._obsolete.append(path)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is not None:
            self._discard()
            return
        try:
            self._commit()
        except BaseException:
            self._discard()
            raise

    def _commit(self) -> None:
        """Flush every temporary file and set its mode (`_mode_for`), then rename each onto its
        final path; a failure undoes the renames done (`_put_back`). Then remove the files
        given to `remove_after`."""
        for temp, final, mode in self._pending:
            try:
                fd = os.open(temp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.chmod(temp, _mode_for(final, mode))
            except OSError as err:
                raise OutputPathError(f"cannot write {final}: {err.strerror}") from None
        # a signal that ends the `lowrank` command came while writing, and its exception was
        # swallowed on the way (a finalizer, user code): the outputs stay temporary and go
        raise_if_terminated()
        replaced: list[tuple[Path, Path | None]] = []
        for temp, final, _ in self._pending:
            try:
                replaced.append((final, _keep_old(final)))
                os.replace(temp, final)
            except BaseException as err:
                failures = _put_back(replaced)
                if not isinstance(err, OSError):
                    raise
                outcome = (
                    f"could not put back {'; '.join(failures)}"
                    if failures
                    else "every output is as it was before"
                )
                raise OutputPathError(f"cannot write {final}: {err.strerror}; {outcome}") from None
        for _, backup in replaced:
            if backup is not None:
                with suppress(OSError):  # every output is in place; a stale link is harmless
                    backup.unlink()
        self._remove_obsolete()

    def _remove_obsolete(self) -> None:
        """Remove the files given to `remove_after`, but none that is by now one of the
        outputs under another name (a name that differs in case only on a case-insensitive
        file system, a path through a linked folder): its directory entry is the output's,
        which removing it would delete. Errors are ignored (a name the file system cannot
        look up included): the outputs are complete and consistent without this."""
        with suppress(OSError, ValueError):
            written = {_file_id(os.stat(final)) for _, final, _ in self._pending}
            for path in self._obsolete:
                with suppress(OSError, ValueError):
                    if _file_id(os.lstat(path)) not in written:
                        path.unlink()

    def _discard(self) -> None:
        """Remove every temporary file and every folder this staging created (what cannot
        be removed is left, so that the error that led here is the one raised)."""
        for temp, _, _ in self._pending:
            with suppress(OSError):
                temp.unlink(missing_ok=True)
        for folder in reversed(self._made):
            shutil.rmtree(folder, ignore_errors=True)


def save_small(
    staging: Staging, tensors: Mapping[str, torch.Tensor], final: Path, metadata: dict[str, str]
) -> None:
    """Stage an in-memory safetensors file (an adapter) for `final`: its tensors ordered as
    safetensors orders them (widest dtype first, so that each lies aligned to its element
    size, then by key) and its metadata sorted (`_layout`), so that the same tensors give the
    same bytes (safetensors' own `save_file` writes the metadata in a different order from
    one process to the next). `DeviceError` for a tensor on the meta device."""
    for key, tensor in tensors.items():
        require_values(f"{final}: tensor {key!r}", tensor)
    order = sorted(tensors, key=lambda key: (-tensors[key].element_size(), key))
    entries = [(key, tensors[key].dtype, tuple(tensors[key].shape)) for key in order]
    with staging.writing(final) as temp:
        write_safetensors(temp, entries, ((key, tensors[key]) for key in order), metadata)


def _layout(
    entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> bytes:
    """The 8-byte length and the JSON header (padded to 8 bytes) of a safetensors file whose
    tensors follow contiguously in the order of `entries`, its metadata in key order."""
    table: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key, dtype, shape in entries:
        if dtype not in DTYPE_NAMES:
            raise FileFormatError(f"tensor {key!r} has dtype {dtype}, which safetensors lacks")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        table[key] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


Blocks = torch.Tensor | Iterable[torch.Tensor]


def write_safetensors(
    path: Path,
    entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Blocks]],
    metadata: dict[str, str],
) -> None:
    """Write a safetensors file one tensor at a time, in the order `entries` plans.

    Each `(key, value)` from `tensors` must match the next planned `(key, dtype, shape)`.
    `value` is the tensor, or an iterable of its consecutive row blocks (`(rows, *shape[1:])`
    each), written as they come: only one block need be in memory. A second thread writes
    each block while the next is drawn, so a producer may reuse a block's memory from the
    second block after it on (`Scratch`), not for the very next one.
    """
    planned = iter(entries)
    with path.open("wb") as handle, ThreadPoolExecutor(1, "lowrank-write") as writer:
        pending: Future[int] | None = None

        def write(data: torch.Tensor) -> None:
            nonlocal pending
            raise_if_terminated()  # a swallowed termination: write no more of a discarded output
            if pending is not None:
                pending.result()
            pending = writer.submit(handle.write, memoryview(data.numpy()))

        try:
            handle.write(_layout(entries, metadata))
            for key, value in tensors:
                want = next(planned, None)
                if want is None or want[0] != key:
                    raise ShapeError(
                        f"{path}: tensor {key!r} does not match the planned entry {want}"
                    )
                _write_blocks(path, key, value, want, write)
        finally:
            if pending is not None:
                pending.result()
        left = next(planned, None)
        if left is not None:
            raise ShapeError(f"{path}: tensor {left[0]!r} was planned but never written")


def _write_blocks(
    path: Path,
    key: str,
    value: Blocks,
    want: tuple[str, torch.dtype, tuple[int, ...]],
    write: Callable[[torch.Tensor], None],
) -> None:
    """Check `value` (a tensor, or its row blocks) against the planned `want` and pass its
    bytes to `write`, block by block; `ShapeError` naming `key` on any mismatch."""
    blocks = [value] if isinstance(value, torch.Tensor) else value
    shape = tuple(want[2])
    rows = count = 0
    for block in blocks:
        whole = block is value or not shape  # a 0-d tensor is its own one block
        got = tuple(block.shape) if whole else tuple(block.shape[1:])
        expected = shape if whole else shape[1:]
        if block.dtype != want[1] or got != expected:
            raise ShapeError(
                f"{path}: tensor {key!r} gives {block.dtype} {tuple(block.shape)}, "
                f"planned {want[1]} {shape}"
            )
        rows += 0 if whole else block.shape[0]
        count += 1
        # a conjugate or negative view (`x.conj()`) stores its values as they read, not as laid out
        data = block.detach().cpu().resolve_conj().resolve_neg().contiguous()
        write(data.reshape(-1).view(torch.uint8))
    if shape and not isinstance(value, torch.Tensor) and rows != shape[0]:
        raise ShapeError(f"{path}: tensor {key!r} got {rows} of {shape[0]} rows")
    if not shape and count != 1:
        raise ShapeError(f"{path}: 0-d tensor {key!r} came as {count} blocks, not one")
