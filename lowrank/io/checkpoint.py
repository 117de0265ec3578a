"""Dense checkpoints on disk, streamed one tensor at a time.

A checkpoint is one safetensors file, or shards (`model-00001-of-00003.safetensors`, …)
listed by an index (`model.safetensors.index.json`: `{"metadata": {...}, "weight_map":
{key: shard}}`). `Checkpoint` reads every header up front (keys, dtypes, shapes and data
offsets, validated by `safe_open`) and then reads tensors, or blocks of their rows, with
plain file reads at those offsets: the memory held is what was asked for, never the file.
`CheckpointWriter` writes a new checkpoint with the same layout (the same shard files and
index), streaming too, through `Staging`: nothing appears on disk under the output names
until every tensor is written.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import require_names, require_path
from ..errors import ArgumentError, FileFormatError, LowRankError, OutputPathError
from .files import (
    Blocks,
    PathLike,
    Scratch,
    Staging,
    data_offsets,
    header,
    read_into,
    read_json,
    write_safetensors,
)

INDEX_SUFFIX = ".safetensors.index.json"
_ADAPTER_PART = re.compile(
    r"\.(lora_(A|B|down|up|mid|embedding_[AB]|magnitude_vector)|hada_(w[12]_[ab]|t[12])"
    r"|lokr_(w[12](_[ab])?|t[12])|alpha|dora_scale|diff(_b)?)(\.|$)"
)
"""A part of a key that adapter files name their tensors by, in every format: PEFT's and
diffusers' `lora_A` / `lora_B`, kohya's `lora_down` / `lora_up` / `lora_mid` / `alpha`,
LyCORIS' `hada_…`, `lokr_…`, `dora_scale` and `diff` / `diff_b`."""


WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".h5", ".msgpack",
    ".onnx", ".onnx_data", ".npz", ".npy", ".pkl", ".pickle", ".ot", ".tflite", ".mlmodel",
    ".keras", ".pdparams", ".index.json",
)
"""Names of files that hold a model's weights, or index them, in any format: the files of
a model folder a merged checkpoint does not take along (`companion_files`)."""


def companion_files(folder: Path) -> list[Path]:
    """The files of the model folder `folder` that describe the model rather than hold its
    weights, which a merged checkpoint in a folder of its own takes along so that it loads
    as the base does (`config.json`, `generation_config.json`, a tokenizer's files, a
    README): its top-level regular files (through symbolic links, as a Hugging Face cache's
    snapshot holds them), except hidden ones and those named as weights (`WEIGHT_SUFFIXES`);
    sub-folders are left out. `FileFormatError` where the folder cannot be listed."""
    try:
        found = [
            path for path in folder.iterdir()
            if path.is_file() and not path.name.startswith(".")
            and not path.name.lower().endswith(WEIGHT_SUFFIXES)
        ]  # fmt: skip
    except OSError as err:
        raise FileFormatError(f"cannot list {folder}: {err.strerror}") from None
    return sorted(found)


@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor lives and what it is: `file`, `dtype`, `shape`, and the
    byte `offset` of its data in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def _read_index_file(
    index: Path, error: type[LowRankError] = FileFormatError
) -> tuple[dict[str, str], dict[str, object]]:
    """`(weight_map, metadata)` of the index `index`: each key's shard, a file name in the
    index's folder, and the index's metadata (empty unless a JSON object); `error` naming
    `index` if it is not an index or a key is longer than `MAX_NAME_LENGTH` (`require_names`)."""
    content = read_json(index, error=error)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise error(f"{index} has no 'weight_map' of key → shard file")
    require_names(index, weight_map, error)
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise error(
                f"{index}: key {key!r} maps to {shard!r}; shards must be file names in the "
                "index's folder"
            )
    metadata = content.get("metadata", {})
    return weight_map, metadata if isinstance(metadata, dict) else {}


def _index_in(folder: Path) -> Path | None:
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise FileFormatError(f"{folder} holds several indexes {[p.name for p in indexes]}")
    return indexes[0] if indexes else None


def shard_note(base: object) -> str:
    """What an error about the base `base` adds where it is one shard given alone (a file,
    or a `Checkpoint` of one, that the index beside it lists among others): that the other
    weights are in the other shards; else ""."""
    if isinstance(base, Checkpoint):
        base = base.index_path or base.path
    if not isinstance(base, (str, os.PathLike)) or not os.path.isfile(base):
        return ""
    path = Path(base)
    try:
        index = _index_in(path.parent)
        shards = set(_read_index_file(index)[0].values()) if index is not None else set()
        listed = path.name in shards and len(shards) > 1  # an index of this file alone: no others
    except LowRankError:  # no readable index: a file of its own
        return ""
    return (f" (one shard of {index}, which lists the others: give the index or its "
            "folder)") if listed else ""  # fmt: skip


class Checkpoint:
    """A safetensors checkpoint: one file, or shards and their index, headers validated.

    `path` is a `.safetensors` file, an index `*.safetensors.index.json`, or a folder with
    one index (or else exactly one `.safetensors` file). `infos` maps every key to its
    `TensorInfo`, file by file (the index's shard order) and sorted by key within a file
    (as `safe_open` lists them); `tensors()` streams them in that order. A checkpoint whose
    every key names an adapter's tensor (`….lora_A.weight`, `….lora_down.weight`,
    `….alpha`, …: an adapter file or PEFT folder given as a model) is a `FileFormatError`.
    """

    def __init__(self, path: PathLike) -> None:
        path = require_path("checkpoint", path)
        if os.path.isdir(path):  # else a file, which reading checks (`require_safetensors`)
            index = _index_in(path)
            if index is None:
                files = sorted(path.glob("*.safetensors"))
                if len(files) != 1:
                    raise FileFormatError(
                        f"{path} holds {len(files)} .safetensors files and no "
                        f"*{INDEX_SUFFIX}; give the file or the index"
                    )
                path = files[0]
            else:
                path = index
        self.path = path
        self.index_path: Path | None = path if path.name.endswith(INDEX_SUFFIX) else None
        self.index_metadata: dict[str, object] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        self.infos: dict[str, TensorInfo] = {}
        if self.index_path is None:
            self._add_file(path)
        else:
            self._read_index(self.index_path)
        if self.infos and all(_ADAPTER_PART.search(key) for key in self.infos):
            raise FileFormatError(
                f"{path} holds an adapter's tensors only (keys like {next(iter(self.infos))!r}), "
                "not a model's weights, where a checkpoint of the model is expected"
            )

    def _add_file(self, file: Path, expected: set[str] | None = None) -> None:
        entries, metadata = header(file)
        offsets = data_offsets(file, entries)
        if expected is not None and set(entries) != expected:
            missing = sorted(expected - set(entries))[:3]
            extra = sorted(set(entries) - expected)[:3]
            raise FileFormatError(
                f"{file} does not hold what {self.index_path} lists: missing {missing}, "
                f"unlisted {extra}"
            )
        for key, (dtype, shape) in entries.items():
            if key in self.infos:
                raise FileFormatError(f"key {key!r} is in both {self.infos[key].file} and {file}")
            self.infos[key] = TensorInfo(file, dtype, shape, offsets[key])
        self.metadata[file] = metadata

    def _read_index(self, index: Path) -> None:
        weight_map, self.index_metadata = _read_index_file(index)
        shards: dict[str, set[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, set()).add(key)
        for shard, keys in shards.items():
            self._add_file(index.parent / shard, keys)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def files(self) -> list[Path]:
        """The safetensors files, in the order their tensors are streamed."""
        return list(self.metadata)

    @property
    def sharded(self) -> bool:
        """Whether the checkpoint is shards with an index."""
        return self.index_path is not None

    @property
    def inputs(self) -> list[Path]:
        """Every file the checkpoint is read from (the index included)."""
        return self.files + ([self.index_path] if self.index_path else [])

    def _info(self, key: str) -> TensorInfo:
        """The `TensorInfo` of `key`; `ArgumentError` naming the checkpoint where it has none."""
        found = self.infos.get(key) if isinstance(key, str) else None
        if found is None:
            raise ArgumentError(
                f"checkpoint {self} holds no tensor {key!r}; its keys look like "
                f"{list(itertools.islice(self.infos, 3))}"
            )
        return found

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`, read from its file."""
        info = self._info(key)
        return read_into(info.file, torch.empty(info.shape, dtype=info.dtype), info.offset)

    def row_blocks(
        self, key: str, elements: int, scratch: Scratch | None = None
    ) -> Iterator[torch.Tensor]:
        """The tensor `key` as consecutive blocks of whole rows (`(rows, *shape[1:])`), each
        of at most `elements` values (at least one row) and read on its own, so that only
        one block is in memory; a 0-d tensor is one block of itself. With `scratch`, every
        block is read into its `"read"` buffer, so each is valid until the next is drawn."""
        info = self._info(key)
        if not info.shape:
            yield self.get(key)
            return
        row = torch.Size(info.shape[1:]).numel()
        row_bytes = row * torch.empty((), dtype=info.dtype).element_size()
        step = max(1, elements // max(1, row))
        for start in range(0, info.shape[0], step):
            rows = min(step, info.shape[0] - start)
            shape = (rows, *info.shape[1:])
            if scratch is None:
                block = torch.empty(shape, dtype=info.dtype)
            else:
                block = scratch.take("read", shape, info.dtype)
            yield read_into(info.file, block, info.offset + start * row_bytes)

    def tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """`(key, tensor)` in `infos`' order (or `keys`' order), one tensor in memory at a
        time."""
        for key in self.infos if keys is None else keys:
            yield key, self.get(key)


class CheckpointWriter:
    """Write a checkpoint laid out as `like` (one file, or the same shards and index) to `out`.

    `out` is the output file for a single-file checkpoint, and the output folder for a
    sharded one (shard and index file names are kept); the caller checks it before
    (`files.require_outputs`, as `merge_checkpoint` does), and `outputs` and `obsolete`
    before `write_all`. `dtypes` gives each key's output dtype, `metadata` each file's
    safetensors metadata (`like`'s by default). `write_all` takes every
    `(key, tensor)` in `like`'s order but the keys of `dropped`, which the output leaves out
    (a shard left with none of its keys is not written); the files appear under their names
    only when `staging` commits.

    A folder holds one sharded checkpoint: `out` may hold an index of `like`'s index name,
    which is replaced, and the shards it lists that this checkpoint has not (`obsolete`)
    are removed once the new index is in place; an index of another name is an
    `OutputPathError` (the folder would hold two indexes and open as neither).
    """

    def __init__(
        self,
        like: Checkpoint,
        out: Path,
        staging: Staging,
        dtypes: dict[str, torch.dtype],
        dropped: Iterable[str] = (),
        metadata: dict[Path, dict[str, str]] | None = None,
    ) -> None:
        self.like = like
        self.metadata = like.metadata if metadata is None else metadata
        self.staging = staging
        self.dtypes = dtypes
        left_out = set(dropped)
        self.kept = {k: info for k, info in like.infos.items() if k not in left_out}
        self.obsolete: list[Path] = []
        if like.sharded:
            folder = staging.folder(out)
            holding = {info.file for info in self.kept.values()}
            self.targets = {f: folder / f.name for f in like.files if f in holding}
            self.obsolete = self._replaced_shards(folder)
        else:
            self.targets = {like.files[0]: out}

    def _replaced_shards(self, folder: Path) -> list[Path]:
        """The shards listed by the index in `folder` that this checkpoint's index replaces
        and not among its own; `OutputPathError` for an index of another name there, an
        index of this name that is none, or the one file its name stands for
        (`model.safetensors` beside `model.safetensors.index.json`), which loaders take before
        the index. Names are compared as the system compares them (`os.path.normcase`:
        case-folded on Windows), so a shard named as an output but for its case is that
        output, never obsolete; `Staging` keeps any other name of an output
        (a case-insensitive file system where `normcase` folds nothing, as macOS's)."""
        assert self.like.index_path is not None
        name = self.like.index_path.name
        others = sorted(
            p.name
            for p in folder.glob(f"*{INDEX_SUFFIX}")
            if os.path.normcase(p.name) != os.path.normcase(name)
        )
        if others:
            raise OutputPathError(
                f"output folder {folder} holds the index {others[0]} of another checkpoint; "
                f"with {name} beside it, it would hold two indexes and open as neither: "
                "write to another folder"
            )
        outputs = {os.path.normcase(path.name) for path in self.outputs}
        single = folder / name.removesuffix(".index.json")
        if single.exists() and os.path.normcase(single.name) not in outputs:
            raise OutputPathError(
                f"output folder {folder} holds {single.name}, a checkpoint of one file, which "
                f"loaders take before the shards of {name}: remove it or write to another folder"
            )
        old = folder / name
        if not old.exists():
            return []
        weight_map, _ = _read_index_file(old, OutputPathError)
        shards = {folder / shard for shard in weight_map.values()}
        return sorted(shard for shard in shards if os.path.normcase(shard.name) not in outputs)

    @property
    def outputs(self) -> list[Path]:
        """Every path the writer produces (the index included)."""
        index = [self._index_target()] if self.like.sharded else []
        return [*self.targets.values(), *index]

    def _index_target(self) -> Path:
        assert self.like.index_path is not None
        return next(iter(self.targets.values())).parent / self.like.index_path.name

    def _entries(self, file: Path) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [
            (k, self.dtypes[k], info.shape)
            for k, info in self.kept.items()
            if info.file == file
        ]

    def write_all(self, tensors: Iterable[tuple[str, Blocks]]) -> None:
        """Write every tensor (in `like`'s key order, those `dropped` left out), file by
        file, then the index; a tensor may come as an iterable of its row blocks
        (`write_safetensors`)."""
        stream = iter(tensors)
        for source, final in self.targets.items():
            entries = self._entries(source)
            part = itertools.islice(stream, len(entries))
            with self.staging.writing(final) as temp:
                write_safetensors(temp, entries, part, self.metadata[source])
        if self.like.sharded:
            self._write_index()
            for shard in self.obsolete:
                self.staging.remove_after(shard)

    def _write_index(self) -> None:
        weight_map = {k: info.file.name for k, info in self.kept.items()}
        total = sum(
            TensorInfo(info.file, self.dtypes[k], info.shape).nbytes
            for k, info in self.kept.items()
        )
        content = {
            "metadata": {**self.like.index_metadata, "total_size": total},
            "weight_map": weight_map,
        }
        with self.staging.writing(self._index_target()) as temp:
            temp.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
