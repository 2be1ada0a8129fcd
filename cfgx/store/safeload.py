"""Loading .pt files without trusting them.

Run dirs and caches travel (group filesystems, tarballs, downloaded checkpoints),
and ``torch.load(weights_only=False)`` runs whatever a pickle asks for. Every blob
cfgx writes is plain tensors, dicts, lists, numbers and strings, so the
weights-only unpickler reads all of them and nothing else; there is deliberately
no fallback to full unpickling. Should a blob ever need another type (say a
scheduler state holding a class instance), allow that one type in ``SAFE_GLOBALS``
rather than loading unsafely.

Size is checked before anything is read into memory (``check_declared_sizes``): a torch zip file
whose entries unpack to more bytes than the file holds (a deflate bomb: a 3 MB file that inflates to
4 GB), or whose pickle declares a storage of another size than its record, is refused from its
metadata alone. The file is opened once, checked and loaded through the same open file, so it cannot
be swapped between the check and the load.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cfgx.errors import CfgxError

# Types allowed besides the weights-only defaults (tensors, (Ordered)dicts, lists, tuples, numbers,
# strings). Empty today: model, EMA, AdamW and LambdaLR states are all made of the defaults.
SAFE_GLOBALS: list[Any] = []


class UnsafeFileError(CfgxError):
    """The file asks to import or call something: refused, never loaded."""


class UnreadableFileError(CfgxError):
    """The file is truncated, not a torch file, or not readable."""


def safe_load(path: str | Path, map_location: Any = "cpu", fix: str = "delete it and re-run to rebuild it",
              file: Any = None) -> Any:
    """``torch.load(path, weights_only=True)``; a refused or broken file is a one-line error naming it.

    The file is opened once (or ``file``, already open on ``path``, is used): its declared sizes are
    checked (``check_declared_sizes``) and its tensors loaded from that same open file.
    """
    path = Path(path)
    try:
        with open(path, "rb") if file is None else contextlib.nullcontext(file) as f:
            check_declared_sizes(f, path, fix)
            f.seek(0)
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(f, map_location=map_location, weights_only=True)
    except CfgxError:
        raise
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the global it refused ("GLOBAL posix.system"); anything
        # else it trips on (an unknown opcode) is a file that is simply not a torch pickle.
        if "GLOBAL" in str(e):
            raise UnsafeFileError(f"refusing to load {path}: it contains pickled code, not plain tensors "
                                  "(a crafted or foreign file); do not use it, and re-create it with cfgx") from None
        raise UnreadableFileError(f"{path} is not a readable torch file (corrupt or foreign); "
                                  f"{fix}") from None
    except OSError as e:
        raise UnreadableFileError(f"cannot read {path} ({e.strerror or type(e).__name__}); {fix}") from None
    except Exception as e:  # truncated zip archives, bad records: torch raises RuntimeError and friends
        raise UnreadableFileError(f"{path} is corrupt or unreadable ({type(e).__name__}); {fix}") from None


# ----------------------------------------------------------------------------- declared sizes


class _Global:
    """What the scan puts where a pickle names a global: a name, never an import."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()


class _Inert:
    """What calling a global gives during the scan: inert, takes any state, items and appends."""

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _SizeScan(pickle.Unpickler):
    """Reads a torch pickle for its storage declarations only: no global is imported, nothing called.

    ``find_class`` returns a :class:`_Global` (a name), so REDUCE/BUILD act on inert stand-ins; each
    persistent id ``('storage', storage_type, key, location, numel[, view])`` is recorded.
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.storages: dict[str, int] = {}  # key -> declared bytes

    def find_class(self, module: str, name: str) -> Any:
        return _Global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
            raise ValueError("not a storage id")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _Global) or isinstance(numel, bool) or not isinstance(numel, int):
            raise ValueError("bad storage id")
        if numel < 0:
            raise _Oversized(f"a storage of {numel} elements")
        self.storages[str(key)] = numel * _itemsize(storage_type)
        return _Inert()


class _Oversized(Exception):
    pass


def _itemsize(storage_type: _Global) -> int:
    if storage_type.module != "torch":
        raise ValueError(f"unknown storage type {storage_type.module}.{storage_type.name}")
    if storage_type.name == "UntypedStorage":
        return 1
    dtype = torch.storage._get_dtype_from_pickle_storage_type(storage_type.name)  # KeyError: not a storage
    return torch._utils._element_size(dtype)


def check_declared_sizes(f: Any, path: Path, fix: str = "delete it and re-run to rebuild it") -> None:
    """Refuse a file whose metadata asks for more memory than the file holds, before loading anything.

    The rule, for a torch zip archive (what ``torch.save`` writes, entries stored uncompressed):
    the entries together unpack to at most the file's size (no deflate bombs, no duplicate names),
    and each storage the pickle declares (``numel * itemsize``) has a record ``data/<key>`` of exactly
    that many bytes. For a legacy (pre-1.6, non-zip) file: the storages it declares add up to at most
    the file's size, since their bytes follow the pickle in the file. Anything else (a file that is not
    a torch file at all) is left to ``torch.load`` to refuse. Raises :class:`UnreadableFileError`.
    """
    size = os.fstat(f.fileno()).st_size if hasattr(f, "fileno") else None

    def refuse(what: str) -> UnreadableFileError:
        return UnreadableFileError(f"refusing to load {path}: {what} (a crafted or damaged file); {fix}")

    f.seek(0)
    if zipfile.is_zipfile(f):
        f.seek(0)
        try:
            archive = zipfile.ZipFile(f)
            infos = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return  # torch's reader refuses it too: today's message
        if size is None:
            size = f.seek(0, io.SEEK_END)
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise refuse("its archive names an entry twice")
        unpacked = sum(i.file_size for i in infos)
        if unpacked > size:
            raise refuse(f"its entries unpack to {unpacked} bytes from a {size}-byte file")
        if not infos:
            return
        prefix = names[0].split("/")[0]  # torch reads the records under the first entry's folder
        records = {i.filename: i.file_size for i in infos}
        pkl = f"{prefix}/data.pkl"
        if pkl not in records:
            return
        scan = _scan(archive.read(pkl), refuse)
        if scan is None:
            return
        for key, nbytes in scan.items():
            have = records.get(f"{prefix}/data/{key}")
            if have is not None and have != nbytes:
                raise refuse(f"it declares a {nbytes}-byte tensor storage whose record holds {have} bytes")
        return
    # Legacy format: magic number, protocol, sys info, then the pickle that declares the storages.
    f.seek(0)
    head = f.read(2)
    f.seek(0)
    if head[:1] != b"\x80":
        return
    try:
        for _ in range(3):
            _SizeScan(f).load()
    except Exception:
        return
    storages = _scan(f, refuse)
    if storages is not None and size is not None and sum(storages.values()) > size:
        raise refuse(f"it declares {sum(storages.values())} bytes of tensors in a {size}-byte file")


def _scan(data: bytes | Any, refuse: Any) -> dict[str, int] | None:
    """The storages a torch pickle declares (key -> bytes), or None when it does not parse as one."""
    scanner = _SizeScan(io.BytesIO(data) if isinstance(data, bytes) else data)
    try:
        scanner.load()
    except _Oversized as e:
        raise refuse(f"it declares {e}") from None
    except Exception:
        return None  # not a pickle torch would load either: left to torch.load's own message
    return scanner.storages
