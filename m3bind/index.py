"""A FAISS vector index of L2-normalised embeddings (inner product = cosine similarity).

Small indices are exact (``IndexFlatIP`` under an id map); above :data:`EXACT_MAX` vectors an
inverted-file index with 8-bit scalar-quantised vectors (``IndexIVFScalarQuantizer``, inner
product) answers approximately: it keeps ids,
supports removal and adds without retraining. Its number of lists probed per query is
calibrated when it is built (:meth:`VectorIndex.calibrate`): the smallest ``nprobe`` whose
leave-one-out recall@10 against exact search, on a sample of the stored vectors, reaches
:data:`TARGET_RECALL`. (HNSW was measured too and not chosen: on 2 cores it built 10⁵
512-d vectors in 150-285 s, so 10⁶ would take about an hour; see docs/performance.md.)
Each vector carries a caller-chosen int64 id
(the catalogue's embedding row id). An index is saved as one file — a small JSON header
(kind, dim, count, id checksum) followed by the serialised FAISS index — written to a
temporary file and moved into place with :func:`os.replace`, so a reader never sees half a
file and a killed writer leaves the previous version intact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path

import numpy as np

from m3bind.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

#: Up to this many vectors the index is exact; above it, IVF.
EXACT_MAX = 50_000
#: Recall@10 against exact search that :meth:`VectorIndex.calibrate` aims for (leave-one-out
#: on stored vectors; a margin above the 0.95 that issue 10 asks of held-out queries).
TARGET_RECALL = 0.97
#: File signature of a saved index.
MAGIC = b"M3IDX001"
_ID_MOD = 1 << 62


def choose_kind(n: int, exact_max: int | None = None) -> str:
    """``"flat"`` (exact) for up to ``exact_max`` (default :data:`EXACT_MAX`) vectors, else ``"ivf"``."""
    return "flat" if n <= (EXACT_MAX if exact_max is None else exact_max) else "ivf"


def ivf_params(n: int) -> tuple[int, int]:
    """``(nlist, nprobe)`` for ``n`` vectors: about 4·√n lists (FAISS's guideline is 4-16·√n;
    4000 at 10⁶), probing 1/64 of them (≥ 8) until :meth:`VectorIndex.calibrate` says better."""
    nlist = int(min(65536, max(16, 4 * math.sqrt(max(n, 1)))))
    nprobe = int(min(nlist, max(8, nlist // 64)))
    return nlist, nprobe


class VectorIndex:
    """Vectors with int64 ids, searched by inner product.

    Args:
        dim: Vector dimension (``None``: taken from the first :meth:`add`).
        kind: ``"flat"`` (exact) or ``"ivf"`` (approximate; needs :meth:`train` first,
            :meth:`build` does it).
        nlist, nprobe: IVF lists and lists probed per query (defaults from :func:`ivf_params`).
    """

    def __init__(self, dim: int | None = None, kind: str = "flat", *,
                 nlist: int | None = None, nprobe: int | None = None):
        if kind not in ("flat", "ivf"):
            raise ValueError(f"unknown index kind {kind!r} (flat, ivf)")
        self.kind = kind
        self.dim = dim
        self.nlist = nlist
        self.nprobe = nprobe
        self.id_sum = 0
        self._index = None
        if dim is not None:
            self._index = self._new(dim)

    def _new(self, dim: int):
        import faiss

        if self.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        nlist = self.nlist or 256
        quantizer = faiss.IndexFlatIP(dim)
        # 8-bit scalar codes: a quarter of the memory and about half the CPU time per query of
        # float vectors (a scan of the probed lists is memory-bound), for 0.003 of recall@10
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        index.nprobe = self.nprobe or min(nlist, 16)
        return index

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, *, kind: str | None = None,
              exact_max: int | None = None, nlist: int | None = None,
              nprobe: int | None = None, seed: int = 0) -> VectorIndex:
        """An index holding ``vectors`` under ``ids``; exact or IVF by size unless ``kind``.

        Args:
            vectors: ``[N, D]`` float32 (``N`` may be 0).
            ids: ``[N]`` int64, unique.
            kind: Force ``"flat"`` or ``"ivf"``.
            exact_max: Size threshold of the automatic choice.
            nlist, nprobe: IVF parameters (defaults from :func:`ivf_params`).
            seed: Seed of the IVF k-means.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n = len(ids)
        kind = kind or choose_kind(n, exact_max)
        dim = int(vectors.shape[1]) if n else None
        if kind == "ivf":
            default_nlist, default_nprobe = ivf_params(n)
            nlist = min(nlist or default_nlist, max(1, n))
            index = cls(dim, "ivf", nlist=nlist, nprobe=nprobe or min(nlist, default_nprobe))
            index.train(vectors, seed=seed)
        else:
            index = cls(dim, "flat")
        if n:
            index.add(vectors, ids)
        if kind == "ivf" and n and nprobe is None:
            index.calibrate(vectors, ids, seed=seed)
        return index

    def calibrate(self, vectors: np.ndarray, ids: np.ndarray, *, target: float = TARGET_RECALL,
                  k: int = 10, queries: int = 256, seed: int = 0) -> dict[int, float]:
        """Set ``nprobe`` to the smallest power of two (or ``nlist``) reaching ``target`` recall@k.

        Leave-one-out: ``queries`` stored vectors are searched for their ``k`` nearest *other*
        vectors, exactly (brute force, no second index) and by the IVF at each ``nprobe``.

        Args:
            vectors, ids: What the index holds (``[N, D]``, ``[N]``), as given to :meth:`build`.
            target: Recall@k to reach.
            k: Neighbours compared.
            queries: Sampled stored vectors used as queries.
            seed: Sampling seed.

        Returns:
            Recall@k per ``nprobe`` tried.
        """
        import faiss

        if self.kind != "ivf" or self._index is None or len(ids) <= k + 1:
            return {}
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        pick = np.random.default_rng(seed).choice(len(ids), min(queries, len(ids)), replace=False)
        q, own = vectors[pick], ids[pick]
        _, rows = faiss.knn(q, vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        def others(row: np.ndarray, o: int) -> set[int]:
            return set([i for i in row.tolist() if i != o][:k])

        truth = [others(ids[r], o) for r, o in zip(rows, own)]
        nlist = self._index.nlist
        tried: dict[int, float] = {}
        p = 1
        while True:
            self._index.nprobe = p
            _, found = self._index.search(q, k + 1)
            tried[p] = float(np.mean([len(t & others(f, o)) / k
                                      for t, f, o in zip(truth, found, own)]))
            if tried[p] >= target or p >= nlist:
                break
            p = min(nlist, 2 * p)
        self.nprobe = p
        log.info("IVF nprobe %d of %d lists: leave-one-out recall@%d %.3f", p, nlist, k, tried[p])
        return tried

    def train(self, vectors: np.ndarray, seed: int = 0) -> None:
        """Train the IVF coarse quantiser (k-means) on ``vectors`` (a sample of at most 64·nlist)."""
        if self.kind != "ivf":
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self._index is None:
            self.dim = int(vectors.shape[1])
            self._index = self._new(self.dim)
        cap = 40 * self._index.nlist  # FAISS warns below 39 points per centroid
        if len(vectors) > cap:
            pick = np.random.default_rng(seed).choice(len(vectors), cap, replace=False)
            vectors = vectors[np.sort(pick)]
        self._index.cp.seed = seed
        self._index.cp.niter = 10
        self._index.train(vectors)

    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add ``vectors`` ``[N, D]`` under ``ids`` ``[N]`` (ids must not be present yet)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"vectors {vectors.shape} and ids {ids.shape} do not match")
        if self._index is None:
            self.dim = int(vectors.shape[1])
            self._index = self._new(self.dim)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vector dim {vectors.shape[1]} != index dim {self.dim}")
        self._index.add_with_ids(vectors, ids)
        self.id_sum = (self.id_sum + int(ids.sum())) % _ID_MOD

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors of ``ids``; returns how many were present."""
        import faiss

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self._index is None or len(ids) == 0:
            return 0
        present = ids[self.contains(ids)]
        removed = int(self._index.remove_ids(faiss.IDSelectorBatch(present)))
        self.id_sum = (self.id_sum - int(present.sum())) % _ID_MOD
        return removed

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` are in the index."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._index is None:
            return np.zeros(len(ids), bool)
        if self.kind == "flat":
            held = set(self._id_map().tolist())
        else:
            held = set(self.ids().tolist())
        return np.fromiter((int(i) in held for i in ids), bool, len(ids))

    def _id_map(self) -> np.ndarray:
        import faiss

        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def ids(self) -> np.ndarray:
        """All ids in the index (unordered for IVF)."""
        import faiss

        if self._index is None:
            return np.zeros(0, np.int64)
        if self.kind == "flat":
            return self._id_map()
        invlists = self._index.invlists
        out = []
        for lst in range(self._index.nlist):
            n = invlists.list_size(lst)
            if n:
                ptr = invlists.get_ids(lst)
                out.append(faiss.rev_swig_ptr(ptr, n).copy())
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: ``(scores [Q, k], ids [Q, k])``, id -1 where fewer exist."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        q = len(queries)
        if self._index is None or len(self) == 0 or k <= 0:
            return np.full((q, max(k, 0)), -np.inf, np.float32), np.full((q, max(k, 0)), -1, np.int64)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dim {queries.shape[1]} != index dim {self.dim}")
        scores, ids = self._index.search(queries, k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    # persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically (temporary file, fsync, :func:`os.replace`)."""
        import faiss

        path = Path(path)
        header = json.dumps({"kind": self.kind, "dim": self.dim, "count": len(self),
                             "id_sum": self.id_sum, "nlist": self.nlist,
                             "nprobe": self.nprobe}).encode()
        body = b"" if self._index is None else faiss.serialize_index(self._index).tobytes()
        atomic_write_bytes(path, MAGIC + struct.pack("<Q", len(header)) + header + body)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorIndex:
        """Read an index written by :meth:`save`.

        Raises:
            ValueError: The file is not an index or is damaged.
        """
        import faiss

        data = Path(path).read_bytes()
        if data[:8] != MAGIC or len(data) < 16:
            raise ValueError(f"not an m3bind index: {path}")
        (hlen,) = struct.unpack("<Q", data[8:16])
        header = json.loads(data[16:16 + hlen])
        index = cls(None, header["kind"], nlist=header.get("nlist"), nprobe=header.get("nprobe"))
        index.dim = header["dim"]
        body = data[16 + hlen:]
        if body:
            try:
                index._index = faiss.deserialize_index(np.frombuffer(body, dtype=np.uint8))
            except RuntimeError as e:
                raise ValueError(f"damaged index {path}: {str(e).splitlines()[0]}") from None
            if index.kind == "ivf" and index.nprobe:
                index._index.nprobe = index.nprobe
        if len(index) != header["count"]:
            raise ValueError(f"index {path} holds {len(index)} vectors, header says {header['count']}")
        index.id_sum = int(header["id_sum"])
        return index
