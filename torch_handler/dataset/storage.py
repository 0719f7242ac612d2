"""Results of :func:`torch_handler.deep_shap` streamed to ``.npy`` files, resumable.

Layout for ``out="shap.npy"``: ``shap.npy`` (one model input; several inputs write
``shap.input0.npy``, ``shap.input1.npy``, ...), a sidecar ``shap.npy.deep_shap.json`` and a
lock file ``shap.npy.deep_shap.lock``.

Safety, in the order things happen:

* **One writer.** An exclusive ``flock`` on the lock file for the whole run; a second process
  (or call) on the same ``out`` is refused, never interleaved.
* **Atomic creation.** The sidecar (``done = 0``) is written first, then each ``.npy`` file is
  written in full size (header, then a sparse body) under a temporary name and renamed into
  place: a ``.npy`` file never exists half-made.
* **Rows, then progress.** Rows are written in place (plain file writes, so they never count
  in the process's memory), the files are fsynced, and only then does the sidecar (written to
  a temporary file, fsynced, renamed) say they are done. A kill at any moment leaves a sidecar
  whose ``done`` rows are on disk.
* **Verified before trusted.** On resume the sidecar's own checksum, its fingerprint of the
  run (model parameters, input shapes and dtypes, references, target / outputs, chunking), the
  ``.npy`` headers and sizes, and a digest of the ``done`` rows of every file are checked; the
  driver checks the digest of the inputs (and references) of those rows as it skips them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "torch_handler.deep_shap/1"
READ_BLOCK = 16 << 20


def new_digest():
    return hashlib.blake2b(digest_size=32)


def update_digest(digest, tensor: torch.Tensor) -> None:
    """Feed a tensor's bytes (row-major, on the CPU) into ``digest``."""
    digest.update(np.ascontiguousarray(tensor.detach().cpu().numpy()))


def tensor_digest(*tensors) -> str:
    digest = new_digest()
    for t in tensors:
        digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
        update_digest(digest, t)
    return digest.hexdigest()


def text_digest(text: str) -> str:
    digest = new_digest()
    digest.update(text.encode())
    return digest.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """Digest of the model's class and every parameter and buffer (names, shapes, dtypes, values)."""
    digest = new_digest()
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            digest.update(repr((name, tuple(value.shape), str(value.dtype))).encode())
            update_digest(digest, value)
    return digest.hexdigest()


def output_paths(out, inputs: int) -> list[Path]:
    """The ``.npy`` file of each model input (``.npy`` appended when missing)."""
    path = Path(os.fspath(out))
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    if inputs == 1:
        return [path]
    return [path.with_name(f"{path.stem}.input{i}.npy") for i in range(inputs)]


def _atomic_write(path: Path, data: bytes, size: int | None = None) -> None:
    """Write ``data`` (extended with zeros to ``size`` bytes, sparse on disk) under a temporary
    name, fsync, and rename it to ``path``: readers see the old file or the whole new one."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if size is not None:
                handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _header(shape, dtype) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_2_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def _create_npy(path: Path, shape, dtype) -> None:
    """A full-size ``.npy`` (zeros, sparse on disk), created under a temporary name and renamed."""
    header = _header(shape, dtype)
    _atomic_write(path, header, len(header) + int(np.prod(shape)) * np.dtype(dtype).itemsize)


def _read_header(path: Path):
    with open(path, "rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
        if read is None:
            raise ValueError(f"unknown .npy format version {major}")
        shape, fortran, dtype = read(handle)
        return tuple(shape), fortran, np.dtype(dtype), handle.tell()


class Store:
    """The ``.npy`` files and sidecar of one run, held under an exclusive lock.

    ``done``: rows already on disk (0 for a fresh run); ``saved``: the sidecar's record
    (its ``inputs`` digest of the done rows' inputs and references is for the driver to check).
    """

    def __init__(self, out, shapes: list[tuple], dtypes: list, fingerprint: dict, resume: bool):
        self.paths = output_paths(out, len(shapes))
        self.sidecar = self.paths[0].parent / f"{output_paths(out, 1)[0].name}.deep_shap.json"
        self.shapes, self.fingerprint = [tuple(s) for s in shapes], fingerprint
        self.dtypes = [np.dtype(d) for d in dtypes]  # one per model input, as the inputs' own
        self.row_bytes = [int(np.prod(s[1:], dtype=np.int64)) * d.itemsize for s, d in zip(self.shapes, self.dtypes,
                                                                                            strict=True)]
        self.paths[0].parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.sidecar.with_suffix(".lock"))
        try:
            self._open(resume)
        except BaseException:
            self.release()
            raise

    # ---------------------------------------------------------------- opening

    def _open(self, resume: bool) -> None:
        existing = [p for p in [self.sidecar, *self.paths] if p.exists()]
        if existing and not resume:
            raise FileExistsError(
                f"deep_shap: {', '.join(map(str, existing))} already exist. Pass resume=True to continue (or "
                "reuse) the run that wrote them with the same arguments, or delete them to start over."
            )
        self.saved = self._load_sidecar() if self.sidecar.exists() else None
        if self.saved is None and existing:
            # deep_shap writes its sidecar before any .npy file: files without one are not a run
            # of deep_shap (or their record was deleted), and resume must not overwrite them.
            raise FileExistsError(
                f"deep_shap: resume=True refused: {', '.join(map(str, existing))} exist without the sidecar "
                f"{self.sidecar} that deep_shap writes before them, so they are not a run to resume. Move or "
                "delete them, or write to another out."
            )
        if self.saved is None:
            self.done, self.results = 0, [new_digest() for _ in self.paths]
            self._write_sidecar(inputs={}, complete=False)
            for path, shape, dtype in zip(self.paths, self.shapes, self.dtypes, strict=True):
                _create_npy(path, shape, dtype)
            self._open_files()
            return
        self._check_fingerprint(self.saved["fingerprint"])
        self.done = int(self.saved["done"])
        if self.done == 0 and not all(p.exists() for p in self.paths):  # killed while creating them
            for path, shape, dtype in zip(self.paths, self.shapes, self.dtypes, strict=True):
                _create_npy(path, shape, dtype)
        self.results = [self._verify_file(p, s, t, d, rb)
                        for p, s, t, d, rb in zip(self.paths, self.shapes, self.dtypes,
                                                  self.saved["results"] or [""] * len(self.paths), self.row_bytes,
                                                  strict=True)]
        self._open_files()

    def _open_files(self) -> None:
        self.offsets = [_read_header(p)[3] for p in self.paths]
        self._files = [open(p, "r+b") for p in self.paths]

    def _load_sidecar(self) -> dict:
        try:
            record = json.loads(self.sidecar.read_text())
            body = {k: v for k, v in record.items() if k != "checksum"}
            ok = record.get("format") == FORMAT and record.get("checksum") == _checksum(body)
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise ValueError(
                f"deep_shap: {self.sidecar} is not a valid deep_shap sidecar (unreadable, another format, or its "
                "checksum does not match); the results next to it cannot be trusted. Delete it and the .npy "
                "files to start over."
            )
        return record

    def _check_fingerprint(self, saved: dict) -> None:
        differing = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if differing:
            details = "; ".join(f"{k}: stored {_short(saved.get(k))}, now {_short(self.fingerprint.get(k))}"
                                for k in differing)
            raise ValueError(
                f"deep_shap: resume=True refused: {self.sidecar} was written by a run with other arguments "
                f"({details}). Resume with the same model, inputs, references, target / outputs and batch_size, "
                "or write to another out path."
            )

    def _verify_file(self, path: Path, shape, dtype_made, expected: str, row_bytes: int):
        """The ``.npy`` header and size as created, and the digest of its ``done`` rows."""
        corrupt = f"deep_shap: {path} does not hold what the sidecar {self.sidecar} records"
        try:
            found, fortran, dtype, offset = _read_header(path)
            size = path.stat().st_size
        except (OSError, ValueError) as error:
            raise ValueError(f"{corrupt} ({error}). Delete the files to start over.") from error
        if (found, fortran, dtype) != (tuple(shape), False, dtype_made) or size != offset + shape[0] * row_bytes:
            raise ValueError(f"{corrupt} (shape {found}, {dtype}, {size} bytes). Delete the files to start over.")
        digest = new_digest()
        with open(path, "rb") as handle:
            handle.seek(offset)
            left = self.done * row_bytes
            while left:
                block = handle.read(min(left, READ_BLOCK))
                if not block:
                    break
                digest.update(block)
                left -= len(block)
        if self.done and digest.hexdigest() != expected:
            raise ValueError(
                f"{corrupt}: its first {self.done} rows changed since they were written. Delete the files "
                "to start over."
            )
        return digest

    # ---------------------------------------------------------------- writing

    def write(self, start: int, values) -> None:
        """Write rows ``start..`` of every input's results (arrays (n, ...) in file order)."""
        for handle, offset, value, digest, row_bytes, dtype in zip(self._files, self.offsets, values, self.results,
                                                                   self.row_bytes, self.dtypes, strict=True):
            array = np.ascontiguousarray(value, dtype=dtype)
            handle.seek(offset + start * row_bytes)
            handle.write(array)
            digest.update(array)

    def checkpoint(self, done: int, inputs: dict, complete: bool = False) -> None:
        """Make rows ``..done`` durable, then record them (and the inputs' digests) in the sidecar."""
        for handle in self._files:
            handle.flush()
            os.fsync(handle.fileno())
        self.done = done
        self._write_sidecar(inputs, complete)

    def _write_sidecar(self, inputs: dict, complete: bool) -> None:
        body = {"format": FORMAT, "fingerprint": self.fingerprint, "done": self.done, "complete": complete,
                "results": [d.hexdigest() for d in self.results] if self.done else None, "inputs": inputs}
        _atomic_write(self.sidecar, json.dumps({**body, "checksum": _checksum(body)}, indent=1).encode())

    def arrays(self) -> list[np.memmap]:
        return [np.load(p, mmap_mode="r") for p in self.paths]

    def release(self) -> None:
        for handle in getattr(self, "_files", []):
            handle.close()
        self._files = []
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _lock(path: Path):
    """An open file holding an exclusive flock (None where flock does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one writer is the user's responsibility there
        return None
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        raise RuntimeError(
            f"deep_shap: another process (or call) is writing to the results locked by {path}; wait for it to "
            "finish, or write to another out path."
        ) from error
    return handle


def stored_fingerprint(out) -> dict | None:
    """The fingerprint a previous run recorded next to ``out`` (unverified: :class:`Store`
    verifies it), or None. Lets a resumed run reuse the chunk size it chose."""
    sidecar = output_paths(out, 1)[0]
    sidecar = sidecar.parent / f"{sidecar.name}.deep_shap.json"
    try:
        return json.loads(sidecar.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
