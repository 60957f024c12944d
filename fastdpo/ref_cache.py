"""Precomputed reference log-probs for DPO.

The reference model of DPO is frozen, so its per-sequence log-probs are a pure function of
(reference weights, token ids). :class:`ReferenceCache` computes them once for a whole dataset,
stores them in a safetensors file together with what they depend on, and hands them back per
batch in TRL order::

    cache = ReferenceCache.build(pairs, ref_model, "ref_logps.safetensors", batch_size=8)
    ...
    cache = ReferenceCache.load("ref_logps.safetensors", pairs=pairs, ref_model=ref_model)
    ref_chosen, ref_rejected = cache.lookup(batch_pairs)
    out = fastdpo.loss(..., ref_logps=torch.cat([ref_chosen, ref_rejected]))

A *pair* is the token ids of one preference example: a mapping with TRL 1.16's keys ``prompt_ids``,
``chosen_ids``, ``rejected_ids`` (as its DPOTrainer tokenizes; chosen / rejected are the completions
only, without the prompt), TRL < 1.0's ``prompt_input_ids``, ``chosen_input_ids``,
``rejected_input_ids``, or a ``(prompt, chosen, rejected)`` tuple; each entry is a list / 1-D tensor /
array of ints. ``pairs`` may be a list of those or a ``datasets.Dataset`` with those columns.

What is checked, and how (nothing stale is ever returned silently):

* data: every pair has a content key, blake2b-128 over its prompt, chosen and rejected ids (each
  part length-prefixed, int64 little endian). :meth:`ReferenceCache.lookup` raises
  :class:`StaleReferenceCacheError` for a pair whose key is not in the cache (other tokenizer,
  other truncation, other dataset); ``load(path, pairs=...)`` checks a whole dataset up front.
  The file also records a dataset-level hash (blake2b-256 over the keys in stored order).
* reference weights: ``reference_id`` is a blake2b-256 over the reference model's state dict
  (every tensor's name, dtype, shape and raw bytes, names sorted), see :func:`weights_fingerprint`.
  ``load(path, ref_model=...)`` recomputes it and raises on a difference; ``load(path)`` without
  ``ref_model=`` / ``reference_id=`` cannot tell a cache of another model and warns
  (:class:`UnverifiedReferenceCacheWarning`) unless ``verify_reference=False`` says so explicitly.
  Cost of the fingerprint: one pass over the weights on one core, plus a device-to-host copy for GPU
  weights; measured ~0.9 GB/s on a 2-core CPU machine (200 MB fp32 in 0.22 s), i.e. ~4.5 s for a 1B-parameter fp32 model, ~2.2 s
  in bf16, ~16 s for 7B in bf16. A tiny test model takes milliseconds. A user string (``reference_id="org/model@rev"``)
  can replace the hash where that is too slow.
* the file itself: format name and version, and a blake2b-256 over the stored tensors'
  bytes (safetensors has no checksum) detect truncated, edited or foreign files
  (:class:`CorruptReferenceCacheError`).
* durability: ``build`` checks that the destination can be written before computing anything; ``save``
  writes ``<path>.tmp<pid>``, fsyncs it, renames it over ``path`` and fsyncs the folder; a failed save
  removes its temporary file, and temporary files left by killed runs (pid no longer running on this
  machine) are removed.

The log-probs come from ``compute_fn(batch_pairs) -> (chosen [b], rejected [b])``; with a model
instead, :func:`make_compute_fn` packs the pairs (``fastdpo.packing.pack_pairs``, shared prompt) and
scores the completions with ``fastdpo.model.model_sequence_logps`` under ``torch.no_grad``. They are whatever compute_fn returns
(sums over completion tokens for the default); the cache does not know about truncation or
scaling done at training time, so build it with the same ids the trainer sees.
"""
from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch

from . import __version__
from .model import model_sequence_logps
from .packing import pack_pairs, pair_parts
from .validate import check_bool, check_int, require

__all__ = [
    "ReferenceCache",
    "ReferenceCacheError",
    "StaleReferenceCacheError",
    "CorruptReferenceCacheError",
    "UnverifiedReferenceCacheWarning",
    "pair_key",
    "dataset_hash",
    "weights_fingerprint",
    "make_compute_fn",
]

FORMAT_NAME = "fastdpo.ref_cache"
FORMAT_VERSION = 1
KEY_BYTES = 16

class ReferenceCacheError(ValueError):
    """Base class: the cache cannot be used as asked."""


class StaleReferenceCacheError(ReferenceCacheError):
    """The cache was built for other data or another reference model."""


class CorruptReferenceCacheError(ReferenceCacheError):
    """The file is not a (readable, intact, supported) fastdpo reference cache."""


class UnverifiedReferenceCacheWarning(UserWarning):
    """A cache was loaded without checking which reference model it was built with."""


# ----------------------------------------------------------------------------------------------
# hashing


def _ids(x: Any, what: str):
    """Token ids as a 1-D int64 numpy array."""
    import numpy as np

    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu", torch.int64)
        if t.dim() != 1:
            raise ValueError(f"{what} must be 1-D token ids, got shape {tuple(t.shape)}")
        return t.numpy()
    a = np.asarray(x)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(f"{what} must be a 1-D sequence of ints, got {type(x).__name__} "
                         f"with shape {a.shape} and dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _split_pair(pair: Any):
    return tuple(_ids(p, name) for p, name in zip(pair_parts(pair), ("prompt", "chosen", "rejected")))


def pair_key(pair: Any) -> bytes:
    """16-byte content key of one pair: blake2b over its length-prefixed int64 ids."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"fastdpo-pair-v1")
    for part in _split_pair(pair):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part.astype("<i8", copy=False).tobytes())
    return h.digest()


def _keys_hash(keys: Iterable[bytes]) -> str:
    h = hashlib.blake2b(digest_size=32, person=b"fastdpo-data-v1")
    for k in keys:
        h.update(k)
    return h.hexdigest()


def dataset_hash(pairs: Iterable[Any]) -> str:
    """Dataset-level hash: blake2b-256 over the distinct pair keys in first-occurrence order.

    Equals ``ReferenceCache.build(pairs, ...).dataset_hash``.
    """
    return _keys_hash(dict.fromkeys(pair_key(p) for p in pairs))


def _tensor_bytes(t: torch.Tensor):
    """The tensor's raw bytes (host, contiguous) as a buffer object."""
    t = t.detach()
    if hasattr(t, "full_tensor"):  # DTensor (FSDP2 / tensor parallel)
        t = t.full_tensor()
    if t.is_meta:
        raise ValueError("cannot fingerprint meta tensors: materialise the weights first")
    t = t.to("cpu").contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8).numpy() if t.numel() else b""  # a buffer: hashed without a copy


def weights_fingerprint(model_or_state_dict: Any) -> "tuple[str, dict]":
    """Identity of reference weights: (blake2b-256 hex, summary dict).

    Hashes every entry of the state dict in sorted-name order: name, dtype, shape and raw bytes, so
    any changed value, dtype cast or reshaped tensor changes the hash. One pass over the weights;
    see the module docstring for the cost. The summary (tensor count, element count, elements per
    dtype, model class) is informational.
    """
    if isinstance(model_or_state_dict, torch.nn.Module):
        sd = model_or_state_dict.state_dict()
        cls = type(model_or_state_dict).__name__
    else:
        sd = dict(model_or_state_dict)
        cls = None
    h = hashlib.blake2b(digest_size=32, person=b"fastdpo-wts-v1")
    dtypes: dict[str, int] = {}
    numel = 0
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            continue
        shape = list(t.shape)
        dt = str(t.dtype).replace("torch.", "")
        header = json.dumps([name, dt, shape]).encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        data = _tensor_bytes(t)
        h.update(memoryview(data).nbytes.to_bytes(8, "little"))
        h.update(data)
        n = t.numel()
        numel += n
        dtypes[dt] = dtypes.get(dt, 0) + n
    summary = {"class": cls, "num_tensors": len(sd), "num_elements": numel, "elements_per_dtype": dtypes}
    return h.hexdigest(), summary


def _payload_hash(tensors: dict) -> str:
    h = hashlib.blake2b(digest_size=32, person=b"fastdpo-load-v1")
    for name in ("pair_keys", "chosen_logps", "rejected_logps"):
        data = _tensor_bytes(tensors[name])
        h.update(name.encode() + b"\0" + memoryview(data).nbytes.to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _check_reference_header(path, meta: dict) -> None:
    """The header's reference identity is well formed (the payload hash does not cover the header): a weights
    fingerprint is 64 hex digits, no identity is an empty id; otherwise the file is damaged."""
    kind, reference_id = meta.get("reference_id_kind"), meta.get("reference_id")
    well_formed = {"weights_blake2b256": lambda i: len(i) == 64 and all(ch in "0123456789abcdef" for ch in i),
                   "user": lambda i: True, "none": lambda i: i == ""}
    if kind not in well_formed or not isinstance(reference_id, str) or not well_formed[kind](reference_id):
        raise CorruptReferenceCacheError(
            f"{path}: damaged header: reference_id {str(reference_id)[:80]!r} is not a valid id of kind {kind!r} "
            f"(weights_blake2b256: 64 hex digits; user: any string; none: empty); rebuild the cache")


# ----------------------------------------------------------------------------------------------
# default compute function


def make_compute_fn(model: torch.nn.Module, *, pad_token_id: int = 0
                    ) -> Callable[[Sequence[Any]], "tuple[torch.Tensor, torch.Tensor]"]:
    """compute_fn for a Hugging Face causal LM.

    Packs the batch's pairs with :func:`fastdpo.packing.pack_pairs` (shared prompt, one row: attention costs
    the sum over the pairs' segments) and scores them with :func:`fastdpo.model.model_sequence_logps` under ``torch.no_grad``
    (fused hidden/LM-head form, logits never materialised; config logit transforms applied). Returns float32
    (chosen [b], rejected [b]) sums on the CPU. Train/eval mode is left to the caller (use eval for a reference).
    """

    def compute(batch_pairs: Sequence[Any]):
        prompts, chosen, rejected = zip(*(_split_pair(p) for p in batch_pairs))
        batch = pack_pairs(prompts, chosen, rejected, shared_prompt=True, pad_token_id=pad_token_id)
        with torch.no_grad():
            logps = model_sequence_logps(model, batch).logps.float().cpu()
        b = len(batch_pairs)
        return logps[:b], logps[b:]

    return compute


# ----------------------------------------------------------------------------------------------
# the cache


def _temp_path(path: str, pid: int) -> str:
    return f"{path}.tmp{pid}"


def _check_destination(path: str) -> None:
    """Fail before any work if a new file cannot be written next to `path` (names path and the reason)."""
    if os.path.isdir(path):
        raise ReferenceCacheError(f"cannot write the reference cache to {path}: it is a directory")
    probe = _temp_path(path, os.getpid())
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ReferenceCacheError(f"cannot write the reference cache to {path}: {e.strerror or e} "
                                  f"(checked before computing anything)") from e


def _remove_stale_temp_files(path: str) -> None:
    """Remove `<path>.tmp<pid>` files of processes that no longer run (a run killed during save)."""
    for temp in glob.glob(glob.escape(path) + ".tmp*"):
        pid = temp[len(path) + len(".tmp"):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            os.remove(temp)
        except PermissionError:  # the process exists (another user's)
            pass


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="pair")


class ReferenceCache:
    """Reference log-probs of a dataset, keyed by pair content. Build with :meth:`build`, reopen
    with :meth:`load`, query with :meth:`lookup` / :meth:`ref_logps`."""

    def __init__(self, pair_keys: torch.Tensor, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                 metadata: dict):
        self.pair_keys = pair_keys  # uint8 [P, 16]
        self.chosen_logps = chosen_logps  # float32 [P]
        self.rejected_logps = rejected_logps  # float32 [P]
        self.metadata = dict(metadata)
        kb = pair_keys.numpy().tobytes()
        self._index = {kb[i * KEY_BYTES:(i + 1) * KEY_BYTES]: i for i in range(pair_keys.shape[0])}
        if len(self._index) != pair_keys.shape[0]:
            raise CorruptReferenceCacheError("reference cache has duplicate pair keys")

    # -- properties ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.pair_keys.shape[0]

    def __contains__(self, pair: Any) -> bool:
        return self._key(pair) in self._index

    @property
    def dataset_hash(self) -> str:
        return self.metadata["dataset_hash"]

    @property
    def reference_id(self) -> str:
        return self.metadata["reference_id"]

    def __repr__(self) -> str:
        ref = self.reference_id[:16] or "<unknown>"
        return f"ReferenceCache(pairs={len(self)}, dataset={self.dataset_hash[:16]}, reference={ref})"

    # -- build ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, pairs: Sequence[Any], source: "torch.nn.Module | Callable", path: "str | os.PathLike | None" = None,
              *, batch_size: int = 8, ref_model: "torch.nn.Module | None" = None,
              reference_id: "str | None" = None, pad_token_id: int = 0, sort_by_length: bool = True,
              progress: bool = True, metadata: "dict | None" = None) -> "ReferenceCache":
        """Compute the reference log-probs of every distinct pair and (if ``path``) save them.

        ``source`` is a model (the default :func:`make_compute_fn` is used and its weights are
        fingerprinted) or a ``compute_fn(batch_pairs) -> (chosen [b], rejected [b])``. With a
        compute_fn, pass ``ref_model`` (fingerprinted) or ``reference_id`` (any string naming the
        reference) so stale references can be detected; without either the cache records none and
        warns. Pairs (a list of rows or a ``datasets.Dataset``) are deduplicated and, with
        ``sort_by_length``, batched by length to cut padding. ``metadata``: extra JSON-able user
        information stored in the file. The destination is checked to be writable before anything is
        computed.
        """
        check_int("batch_size", batch_size, minimum=1)
        check_int("pad_token_id", pad_token_id, minimum=0)
        check_bool("sort_by_length", sort_by_length)
        check_bool("progress", progress)
        if reference_id is not None and not isinstance(reference_id, str):
            raise TypeError(f"reference_id must be a str or None, got {type(reference_id).__name__}")
        try:
            user_metadata = json.dumps(metadata or {}, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
        if path is not None:
            path = os.fspath(path)
            _check_destination(path)
            _remove_stale_temp_files(path)
        if isinstance(source, torch.nn.Module):
            ref_model = source if ref_model is None else ref_model
            compute_fn = make_compute_fn(source, pad_token_id=pad_token_id)
        elif callable(source):
            compute_fn = source
        else:
            raise TypeError("source must be a torch.nn.Module or a callable compute_fn")
        pairs = list(pairs)
        if not pairs:
            raise ValueError("no pairs to cache")

        summary: dict = {}
        if reference_id is None and ref_model is not None:
            reference_id, summary = weights_fingerprint(ref_model)
            id_kind = "weights_blake2b256"
        elif reference_id is not None:
            id_kind = "user"
        else:
            warnings.warn("ReferenceCache.build: no ref_model or reference_id given; the cache cannot "
                          "detect a changed reference model")
            reference_id, id_kind = "", "none"

        first: dict[bytes, int] = {}
        for i, p in enumerate(pairs):
            first.setdefault(pair_key(p), i)
        keys = list(first)
        uniq = [pairs[i] for i in first.values()]
        P = len(uniq)
        order = list(range(P))
        if sort_by_length:
            lengths = [sum(len(x) for x in _split_pair(p)) for p in uniq]
            order.sort(key=lambda j: -lengths[j])  # longest first: OOM shows up at once
        chosen = torch.full((P,), float("nan"), dtype=torch.float32)
        rejected = torch.full((P,), float("nan"), dtype=torch.float32)
        bar = _progress(P, progress, "reference log-probs")
        try:
            for s in range(0, P, batch_size):
                idx = order[s:s + batch_size]
                c, r = compute_fn([uniq[j] for j in idx])
                c = torch.as_tensor(c).detach().float().cpu().reshape(-1)
                r = torch.as_tensor(r).detach().float().cpu().reshape(-1)
                if c.numel() != len(idx) or r.numel() != len(idx):
                    raise ValueError(f"compute_fn returned {c.numel()} chosen / {r.numel()} rejected "
                                     f"log-probs for {len(idx)} pairs")
                t = torch.tensor(idx)
                chosen[t] = c
                rejected[t] = r
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        if not (torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
            bad = (~(torch.isfinite(chosen) & torch.isfinite(rejected))).nonzero().flatten()[:5].tolist()
            raise ValueError(f"non-finite reference log-probs for pairs (first occurrences) {bad}")

        import numpy as np

        key_t = torch.from_numpy(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(P, KEY_BYTES).copy())
        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "fastdpo_version": __version__,
            "torch_version": torch.__version__,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "num_pairs": str(P),
            "num_input_pairs": str(len(pairs)),
            "pair_key": "blake2b-128(person='fastdpo-pair-v1') over prompt, chosen, rejected ids, "
                        "each as int64 LE with an 8-byte length prefix",
            "dataset_hash": _keys_hash(keys),
            "reference_id": reference_id,
            "reference_id_kind": id_kind,
            "reference_summary": json.dumps(summary, sort_keys=True),
            "user_metadata": user_metadata,
        }
        cache = cls(key_t, chosen, rejected, meta)
        if path is not None:
            cache.save(path)
        return cache

    # -- save / load ---------------------------------------------------------------------------
    def _tensors(self) -> dict:
        return {"pair_keys": self.pair_keys.contiguous(), "chosen_logps": self.chosen_logps.contiguous(),
                "rejected_logps": self.rejected_logps.contiguous()}

    def save(self, path: "str | os.PathLike") -> None:
        """Write the safetensors file atomically and durably: temporary file, fsync, rename, fsync of the
        folder. A failed save removes its temporary file; those of killed runs are removed too."""
        from safetensors.torch import save_file

        tensors = self._tensors()
        meta = dict(self.metadata)
        meta["payload_hash"] = _payload_hash(tensors)
        path = os.fspath(path)
        _remove_stale_temp_files(path)
        tmp = _temp_path(path, os.getpid())
        try:
            save_file(tensors, tmp, metadata=meta)
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(os.path.dirname(os.path.abspath(path)))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: "str | os.PathLike", pairs: "Iterable[Any] | None" = None, *,
             ref_model: "torch.nn.Module | None" = None, reference_id: "str | None" = None,
             verify_reference: bool = True) -> "ReferenceCache":
        """Open a cache file and verify it.

        Always checks the format, version and payload hash (:class:`CorruptReferenceCacheError`).
        ``pairs``: every pair must be in the cache; ``ref_model``: its weights fingerprint must equal
        the stored one; ``reference_id``: must equal the stored id (:class:`StaleReferenceCacheError`).
        Without ``ref_model`` / ``reference_id`` nothing tells a cache of another reference model: that
        warns (:class:`UnverifiedReferenceCacheWarning`) unless ``verify_reference=False`` opts out
        explicitly. Without ``pairs`` the data is still checked pair by pair in :meth:`lookup`.
        """
        check_bool("verify_reference", verify_reference)
        require(verify_reference or (ref_model is None and reference_id is None),
                "verify_reference=False contradicts ref_model= / reference_id=: pass one or the other")
        if verify_reference and ref_model is None and reference_id is None:
            warnings.warn(f"ReferenceCache.load({os.fspath(path)!r}) without ref_model= or reference_id=: the cache "
                          "is not checked against the reference model and may hold another model's log-probs "
                          "(pass ref_model=, reference_id=, or verify_reference=False to accept it as is)",
                          UnverifiedReferenceCacheWarning, stacklevel=2)
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no reference cache at {path}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                if meta.get("format") != FORMAT_NAME:
                    raise CorruptReferenceCacheError(
                        f"{path} is a safetensors file but not a fastdpo reference cache "
                        f"(format={meta.get('format')!r})")
                want = {"pair_keys", "chosen_logps", "rejected_logps"}
                if not want <= names:
                    raise CorruptReferenceCacheError(f"{path} lacks tensors {sorted(want - names)}")
                tensors = {n: f.get_tensor(n) for n in want}
        except ReferenceCacheError:
            raise
        except Exception as e:  # SafetensorError, header/JSON errors, truncation, ...
            raise CorruptReferenceCacheError(f"cannot read reference cache {path}: {type(e).__name__}: {e}") from e

        try:
            version = int(meta.get("format_version", ""))
        except ValueError:
            raise CorruptReferenceCacheError(f"{path}: bad format_version {meta.get('format_version')!r}") from None
        if version != FORMAT_VERSION:
            raise CorruptReferenceCacheError(
                f"{path}: reference cache format version {version}, this fastdpo ({__version__}) "
                f"reads version {FORMAT_VERSION}; rebuild the cache")
        keys_t, c, r = tensors["pair_keys"], tensors["chosen_logps"], tensors["rejected_logps"]
        P = c.shape[0] if c.dim() == 1 else -1
        if (keys_t.dtype != torch.uint8 or tuple(keys_t.shape) != (P, KEY_BYTES) or c.dtype != torch.float32
                or r.dtype != torch.float32 or tuple(r.shape) != (P,) or str(P) != meta.get("num_pairs")):
            raise CorruptReferenceCacheError(
                f"{path}: unexpected tensor layout pair_keys {keys_t.dtype}{tuple(keys_t.shape)}, chosen_logps "
                f"{c.dtype}{tuple(c.shape)}, rejected_logps {r.dtype}{tuple(r.shape)}, num_pairs "
                f"{meta.get('num_pairs')}")
        if _payload_hash(tensors) != meta.get("payload_hash"):
            raise CorruptReferenceCacheError(f"{path}: payload hash mismatch, the file was modified or damaged")
        kb = keys_t.numpy().tobytes()
        if _keys_hash(kb[i:i + KEY_BYTES] for i in range(0, len(kb), KEY_BYTES)) != meta.get("dataset_hash"):
            raise CorruptReferenceCacheError(f"{path}: dataset hash does not match the stored pair keys")
        _check_reference_header(path, meta)
        meta = {k: v for k, v in meta.items() if k != "payload_hash"}
        cache = cls(keys_t, c, r, meta)
        cache.path = path

        if ref_model is not None:
            cache.check_reference(ref_model)
        if reference_id is not None and reference_id != cache.reference_id:
            raise StaleReferenceCacheError(
                f"{path} was built for reference {cache.reference_id!r}, not {reference_id!r}")
        if pairs is not None:
            cache.check_pairs(pairs)
        return cache

    # -- verification --------------------------------------------------------------------------
    def check_reference(self, ref_model: "torch.nn.Module | dict") -> None:
        """Raise StaleReferenceCacheError unless ``ref_model``'s weights fingerprint is the stored one."""
        kind = self.metadata.get("reference_id_kind")
        if kind != "weights_blake2b256":
            raise StaleReferenceCacheError(
                f"the cache records no weights fingerprint (reference id kind {kind!r}: "
                f"{self.reference_id!r}); cannot verify ref_model, pass reference_id= instead")
        fp, summary = weights_fingerprint(ref_model)
        if fp != self.reference_id:
            raise StaleReferenceCacheError(
                "reference model weights differ from those the cache was built with "
                f"(weights hash {fp[:16]}... != {self.reference_id[:16]}...; now {json.dumps(summary)}, "
                f"cache {self.metadata.get('reference_summary')}); rebuild the cache")

    def check_pairs(self, pairs: Iterable[Any]) -> None:
        """Raise StaleReferenceCacheError unless every pair is in the cache."""
        missing = [i for i, p in enumerate(pairs) if self._key(p) not in self._index]
        if missing:
            raise StaleReferenceCacheError(
                f"{len(missing)} pair(s) are not in the reference cache (dataset {self.dataset_hash[:16]}..., "
                f"{len(self)} pairs), first at positions {missing[:5]}: the token ids differ from those the "
                "cache was built on (other data, tokenizer or truncation); rebuild the cache")

    # -- lookup --------------------------------------------------------------------------------
    @staticmethod
    def _key(item: Any) -> bytes:
        if isinstance(item, (bytes, bytearray)) and len(item) == KEY_BYTES:
            return bytes(item)
        return pair_key(item)

    def lookup(self, pairs: Sequence[Any], device: Any = None) -> "tuple[torch.Tensor, torch.Tensor]":
        """(ref_chosen_logps [B], ref_rejected_logps [B]) float32 for a batch, in the batch's order.

        Items are pairs or 16-byte keys from :func:`pair_key`. Raises StaleReferenceCacheError for
        a pair that is not in the cache.
        """
        idx, missing = [], []
        for i, p in enumerate(pairs):
            j = self._index.get(self._key(p))
            if j is None:
                missing.append(i)
            idx.append(j)
        if missing:
            raise StaleReferenceCacheError(
                f"{len(missing)} of {len(idx)} pairs in the batch are not in the reference cache "
                f"(batch positions {missing[:5]}; cache dataset {self.dataset_hash[:16]}...): their token ids "
                "differ from those the cache was built on; rebuild the cache")
        t = torch.tensor(idx, dtype=torch.long)
        c, r = self.chosen_logps[t], self.rejected_logps[t]
        if device is not None:
            c, r = c.to(device), r.to(device)
        return c, r

    def ref_logps(self, pairs: Sequence[Any], device: Any = None) -> torch.Tensor:
        """``torch.cat(lookup(pairs))``: [2B] in TRL order, for ``fastdpo.loss(..., ref_logps=...)``."""
        return torch.cat(self.lookup(pairs, device=device))
