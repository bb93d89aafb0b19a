"""Safe loading of checkpoints: no file in a checkpoint directory can make trellis run code.

The checksums in metadata.json detect damage, not tampering (whoever can write the directory can rewrite
them), so every pickle trellis reads from a checkpoint goes through an allow-list:

- DCP `.metadata` (a plain pickle that torch's FileSystemReader reads with `pickle.load`): SafeFileSystemReader
  unpickles it with RestrictedUnpickler, whose find_class admits only what DCP metadata holds (listed from the
  GLOBAL/STACK_GLOBAL opcodes of real trellis checkpoints: the dataclasses and enum of
  torch.distributed.checkpoint.metadata, filesystem._StorageInfo, torch.Size, torch dtypes,
  torch.serialization._get_layout, pathlib paths, collections.OrderedDict).
- DCP non-tensor items (BYTE_IO: optimizer param_groups values such as lr and betas), which torch's default load
  planners read with `torch.load(weights_only=False)`: SafeLoadPlanner / SafeEmptyLoadPlanner read them with
  `weights_only=True`. (Tensor items torch already reads with weights_only=True.)
- DeepSpeed's `*.pt` files: loaded by DeepSpeed itself, in many places with `torch.load(weights_only=False)`
  (its TorchCheckpointEngine, zero/stage3.py, base_optimizer.py, checkpoint/universal_checkpoint.py and
  ds_to_universal.py in 0.19.8). check_state_dir() first loads every one of them with `weights_only=True` and
  the few DeepSpeed classes they hold as safe globals (refusing on anything else), and the engine's
  checkpoint engine is replaced by SafeTorchCheckpointEngine (weights_only=True) for the files it reads.
  Residual risk: DeepSpeed's direct torch.load(weights_only=False) calls still unpickle with the full
  unpickler; a file that passed the check can only be replaced between the check and DeepSpeed's read by
  someone who can write the checkpoint directory *while* the run resumes (the universal conversion's own
  output goes to a private mkdtemp directory).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

from trellis.errors import CheckpointError

_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("pathlib", "Path"),
    ("collections", "OrderedDict"),
}


class UnsafePickle(CheckpointError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global (os.system, builtins.eval, ...) is refused before it is even
    imported."""

    def __init__(self, file, source: str = "checkpoint metadata"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == _DCP_METADATA_MODULE and "." not in name:
            import torch.distributed.checkpoint.metadata as md

            obj = getattr(md, name, None)
            if isinstance(obj, type) and obj.__module__ == _DCP_METADATA_MODULE:  # its dataclasses and enums
                return obj
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickle(f"{self.source}: refusing to load it: it references {module}.{name}, which DCP "
                           f"checkpoint metadata never contains (the checkpoint was tampered with or is not "
                           f"a trellis/DCP checkpoint); nothing from it was run")

    def persistent_load(self, pid):
        raise UnsafePickle(f"{self.source}: refusing to load it: persistent ids do not occur in DCP metadata")


def load_dcp_metadata(path: Path):
    """The `Metadata` object of a DCP directory's `.metadata`, through the allow-list."""
    f = Path(path) / ".metadata"
    try:
        with open(f, "rb") as fh:
            return RestrictedUnpickler(fh, str(f)).load()
    except UnsafePickle:
        raise
    except FileNotFoundError as e:
        raise CheckpointError(f"{f}: missing from the checkpoint") from e
    except Exception as e:  # noqa: BLE001 - any malformed pickle
        raise CheckpointError(f"{f}: not readable DCP metadata ({type(e).__name__}: {e})") from e


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader with `.metadata` read through RestrictedUnpickler."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as stream:
            metadata = RestrictedUnpickler(stream, str(path)).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _why(e: Exception) -> str:
    """The line of torch's weights-only error that names the refused global (not its advice to load anyway)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    return text.splitlines()[0] if text else type(e).__name__


def _load_bytes_weights_only(value: io.BytesIO, fqn: str):
    try:
        return torch.load(value, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafePickle(f"checkpoint item {fqn}: refusing to load it: {_why(e)}") from e


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items are read with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = _load_bytes_weights_only(value, read_item.dest_index.fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeEmptyLoadPlanner(_EmptyStateDictLoadPlanner):
    """The planner of dcp_to_torch_save (builds the state from the metadata), with safe non-tensor items."""

    load_bytes = SafeLoadPlanner.load_bytes


def dcp_load(state: dict, path, expected: dict[str, str] | None = None):
    """`dcp.load(state, checkpoint_id=path)` with the allow-listed reader and planner; `expected` ({file name:
    sha256}) verifies every file from the bytes read (checkpoint/storage.py). Returns the reader (its
    `bytes_read` and `verified`). A checksum failure on any rank is one CheckpointError on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from .storage import TrellisReader

    reader = TrellisReader(str(path), expected)
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as e:
        found = _find_checkpoint_error(e)
        if found is not None:
            raise CheckpointError(found.messages) from None
        raise
    return reader


def _find_checkpoint_error(e: BaseException, seen: set | None = None) -> CheckpointError | None:
    """The first CheckpointError inside DCP's CheckpointException (rank -> (exception, stack)), lowest rank
    first, so every rank reports the same line."""
    seen = seen if seen is not None else set()
    if e is None or id(e) in seen:
        return None
    seen.add(id(e))
    if isinstance(e, CheckpointError):
        return e
    nested = []
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        nested += [f[0] if isinstance(f, tuple) else f for _, f in sorted(failures.items())]
    nested += [e.__cause__, e.__context__]
    for n in nested:
        found = _find_checkpoint_error(n, seen)
        if found is not None:
            return found
    return None


def dcp_full_state(path) -> dict:
    """Every tensor of a DCP directory unsharded, in one process (what dcp_to_torch_save + torch.load gave)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    load_dcp_metadata(Path(path))  # a clean one-line refusal before DCP's own error wrapping
    sd: dict = {}
    from .storage import TrellisReader

    _load_state_dict(sd, storage_reader=TrellisReader(str(path)), planner=SafeEmptyLoadPlanner(), no_dist=True)
    return sd


# ---- torch.load with an allow-list, and the pre-load check --------------------------------------------------
def torch_load_weights_only(path, map_location="cpu", safe_globals=()):
    """torch.load(weights_only=True) admitting `safe_globals` (a backend's own checkpoint classes) besides
    tensors and plain values; a refusal or a damaged file is one CheckpointError line naming the file."""
    with torch.serialization.safe_globals(list(safe_globals)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafePickle(f"{path}: refusing to load it: {_why(e)} (only tensors, plain "
                               f"values and the backend's own checkpoint classes are loaded)") from e
        except Exception as e:  # noqa: BLE001 - a damaged file: one line, on every rank (the caller broadcasts)
            raise CheckpointError(f"{path}: not loadable ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def check_state_dir(state_dir: Path, safe_globals=()) -> None:
    """Before any rank loads a checkpoint's state: DCP metadata through the allow-list, every *.pt (DeepSpeed's
    files) through weights_only=True with `safe_globals`. Raises CheckpointError naming the file."""
    state_dir = Path(state_dir)
    if (state_dir / ".metadata").exists() or any(state_dir.glob("*.distcp")):
        load_dcp_metadata(state_dir)
    for f in sorted(state_dir.rglob("*.pt")):
        torch_load_weights_only(f, safe_globals=safe_globals)
