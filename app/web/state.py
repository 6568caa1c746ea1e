"""The app's service layer: model, catalogue, search and file access behind one object.

The Gradio callbacks in :mod:`app.web.app` and :mod:`app.web.api` never touch the library
directly; they go through :class:`Services`, which

* loads the model lazily and keeps a one-line *notice* instead of failing when there is none,
* opens the catalogue when one is configured (and says so when there is none),
* reads every file through :func:`m3bind.io.load` after checking that the path, and every file
  a load of it opens (a series folder's files, a WFDB record's signal files; links resolved),
  lies inside the archive root, Gradio's upload folder or the app's own work folder,
* keeps saved prompt sets as JSON in a user folder,
* remembers the last few upload embeddings (by content) and label embeddings, so that one
  upload labelled zero-shot and then searched is read and embedded once.

Every user-facing failure is an :class:`~m3bind.errors.M3BindError`; the UI layer turns it
into a ``gr.Warning``/``gr.Error`` with its one-line text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import numpy as np

from m3bind.atomic import atomic_write_text
from m3bind.errors import ConfigError, M3BindError, ModelDirError, UnsupportedFormat
from m3bind.modalities import MODALITIES, get_spec

log = logging.getLogger(__name__)

#: File names of a prompt-set store inside the prompt folder.
PROMPT_FILE = "prompt_sets.json"
_PROMPT_NAME = re.compile(r"^[\w .\-]{1,64}$")
#: Entries kept by each of the app's small caches (upload embeddings, label embeddings).
CACHE_ENTRIES = 64


class NotReady(M3BindError):
    """A service the request needs (model, catalogue) is not available yet."""


def default_prompt_dir() -> Path:
    """The per-user folder for saved prompt sets (``$XDG_CONFIG_HOME/m3bind/prompts``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "m3bind" / "prompts"


def upload_dir() -> Path:
    """Gradio's upload folder (where browser uploads land)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


@dataclass
class Services:
    """Everything the app needs, created once per server.

    Args:
        model_dir: Model directory (``m3bind.load_model``); may be missing (a notice is shown).
        catalog_url: SQLAlchemy URL of the archive catalogue, or ``None``.
        archive_root: Folder whose files the browser may open (and the default folder to index).
        keep_phi: Show identifying metadata (off by default).
        prompt_dir: Where prompt sets are saved; defaults to :func:`default_prompt_dir`.
        work_dir: Scratch folder for assembled uploads (DICOM series, WFDB pairs).
        max_upload_mb: Upload size limit, also enforced on API file inputs.
        index_workers: Decoder processes of the indexer (``None``: its default; 0 inline).
    """

    model_dir: str | os.PathLike | None
    catalog_url: str | None = None
    archive_root: str | os.PathLike | None = None
    keep_phi: bool = False
    prompt_dir: str | os.PathLike | None = None
    work_dir: str | os.PathLike | None = None
    max_upload_mb: float = 512.0
    index_workers: int | None = None
    _model: Any = field(default=None, init=False, repr=False)
    _model_error: str | None = field(default=None, init=False, repr=False)
    _catalog: Any = field(default=None, init=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)
    _embeddings: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    _label_vectors: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.archive_root = Path(self.archive_root).resolve() if self.archive_root else None
        self.prompt_dir = Path(self.prompt_dir) if self.prompt_dir else default_prompt_dir()
        self.work_dir = Path(self.work_dir or tempfile.mkdtemp(prefix="m3bind-app-")).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ model
    @property
    def model(self):
        """The loaded :class:`~m3bind.model.BoundModel`; raises :class:`NotReady` with a notice."""
        with self._lock:
            if self._model is None and self._model_error is None:
                self._model, self._model_error = self._load_model()
        if self._model is None:
            raise NotReady(self._model_error or "no model loaded")
        return self._model

    def _load_model(self):
        if not self.model_dir:
            return None, "no model directory given: start with --model DIR"
        path = Path(self.model_dir)
        if not (path / "config.json").is_file():
            return None, (f"no trained model in {path}: train it with "
                          "`python train/run_all.py --config train/configs/demo.yaml --out runs/demo`")
        try:
            from m3bind import load_model

            model = load_model(path)
            model.eval()
            log.info("loaded model %s from %s", getattr(model, "model_id", "?"), path)
            return model, None
        except M3BindError as e:
            return None, f"model not loaded: {e.line()}"
        except Exception as e:
            log.exception("model load failed")
            return None, f"model not loaded: {type(e).__name__}: {' '.join(str(e).split())} ({path})"

    def model_notice(self) -> str | None:
        """A one-line notice when no model can be used, else ``None``."""
        try:
            _ = self.model
        except NotReady as e:
            return e.line()
        return None

    # ------------------------------------------------------------- catalogue
    def catalog(self):
        """The :class:`data_registry.catalog.Catalog`; raises :class:`NotReady` when unavailable."""
        if not self.catalog_url:
            raise NotReady("no catalogue configured: start with --catalog URL "
                           "(e.g. sqlite:///archive.db) and index an archive in the Archive tab")
        with self._lock:
            if self._catalog is None:
                try:
                    from data_registry.catalog import Catalog
                except ImportError as e:
                    raise NotReady(f"catalogue support unavailable: {e}") from None
                self._catalog = Catalog(self.catalog_url)
        return self._catalog

    def catalog_notice(self) -> str | None:
        """A one-line notice when search/browse cannot work, else ``None``."""
        try:
            from app.web import archive as archive_api

            catalog = self.catalog()
            if archive_api.item_count(catalog) == 0:
                return "the catalogue is empty: index an archive folder in the Archive tab"
            keys = catalog.model_keys()
            if self._model is not None and archive_api.model_key(self._model) not in keys:
                return ("the catalogue was indexed with another model "
                        f"({', '.join(keys) or 'none'}): index it again in the Archive tab")
        except NotReady as e:
            return e.line()
        except M3BindError as e:
            return e.line()
        return None

    # ------------------------------------------------------------ file access
    def allowed_roots(self) -> list[Path]:
        """Folders whose files the app reads on the browser's behalf."""
        roots = [upload_dir(), self.work_dir]
        if self.archive_root:
            roots.append(self.archive_root)
        if self._catalog is not None and (root := self._catalog.root()) is not None:
            roots.append(Path(root).resolve())  # the archive the catalogue describes
        return roots

    def check_path(self, path: str | os.PathLike) -> Path:
        """Resolve ``path`` and refuse anything outside :meth:`allowed_roots`.

        Raises:
            UnsupportedFormat: The path lies outside the allowed folders (or does not exist).
        """
        p = Path(path)
        if not p.is_absolute() and self.archive_root:
            p = self.archive_root / p
        real = Path(os.path.realpath(p))
        if not any(real == r or r in real.parents for r in self.allowed_roots()):
            raise UnsupportedFormat("path outside the archive and the upload folder", str(path))
        if not real.exists():
            raise UnsupportedFormat("no such file or folder", str(path))
        return real

    def check_item(self, path: str | os.PathLike) -> Path:
        """:meth:`check_path`, and every file a load of the item opens (a series folder's
        files, a WFDB record's signal files) must resolve inside :meth:`allowed_roots` too.

        Raises:
            UnsupportedFormat: The item or one of its files lies outside the allowed folders.
        """
        from m3bind.io.confine import check_confined

        real = self.check_path(path)
        check_confined(real, self.allowed_roots())
        return real

    def check_size(self, paths: Iterable[Path]) -> None:
        """Refuse uploads larger than ``max_upload_mb`` in total."""
        from m3bind.errors import TooLarge

        total = sum(p.stat().st_size for p in paths if p.is_file())
        if total > self.max_upload_mb * 1024 * 1024:
            raise TooLarge(f"upload of {total / 2**20:.1f} MB exceeds the limit of "
                           f"{self.max_upload_mb:g} MB")

    def assemble(self, paths: list[str | os.PathLike]) -> Path:
        """The one path to load for one or several uploaded files.

        One file is loaded as is. Several files (a DICOM series, a WFDB ``.hea``/``.dat`` pair)
        are linked into one fresh folder under the work folder; a WFDB record is then named by
        its ``.hea`` file, a series by the folder.
        """
        checked = [self.check_path(p) for p in paths]
        self.check_size(checked)
        if len(checked) == 1:
            return checked[0]
        folder = self.work_dir / "uploads" / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        for p in checked:
            target = folder / _upload_name(p)
            try:
                os.link(p, target)
            except OSError:
                shutil.copyfile(p, target)
        heads = sorted(folder.glob("*.hea"))
        return heads[0] if len(heads) == 1 else folder

    def load(self, path: str | os.PathLike, modality: str | None = None):
        """Read one file or folder through :func:`m3bind.io.load` after the path check."""
        from m3bind.io import load

        real = self.check_item(path)
        if modality and modality not in MODALITIES:
            raise ConfigError(f"unknown modality {modality!r}")
        return load(real, modality or None, keep_phi=self.keep_phi)

    # -------------------------------------------------------------- zero-shot
    def _cached(self, cache: OrderedDict, key: Hashable, compute) -> Any:
        """``cache[key]``, computed on a miss; least recently used entries beyond
        :data:`CACHE_ENTRIES` are dropped."""
        with self._lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        value = compute()
        with self._lock:
            cache[key] = value
            while len(cache) > CACHE_ENTRIES:
                cache.popitem(last=False)
        return value

    def _embedding_key(self, path: Path, modality: str | None) -> tuple | None:
        """Cache key of a file's embedding: its content (with same-stem siblings such as a WFDB
        ``.dat``, or a folder's files), the modality asked for and the model."""
        try:
            files = sorted({path, *path.parent.glob(glob_escape(path.stem) + ".*")}) if path.is_file() \
                else sorted(f for f in path.rglob("*") if f.is_file())
            h = hashlib.blake2b(digest_size=16)
            for f in files:
                h.update(f.name.encode("utf-8", "surrogateescape") + b"\0")
                with open(f, "rb") as fh:
                    for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        h.update(chunk)
        except OSError:
            return None
        return h.hexdigest(), modality or "", str(getattr(self.model, "model_id", ""))

    def embed(self, sample) -> np.ndarray:
        """The sample's embedding ``[D]`` (L2-normalised), remembered by file content."""
        if sample.modality is None:
            raise UnsupportedFormat("modality unknown: choose one", sample.path)
        model = self.model
        if sample.modality not in model.modalities:
            raise ModelDirError(f"the model has no {sample.modality} encoder", str(self.model_dir))

        def compute():
            return np.asarray(model.embed([sample]), np.float32)[0]

        key = self._embedding_key(Path(sample.path), sample.modality) if sample.path else None
        if key is None:
            return compute()
        return self._cached(self._embeddings, ("sample",) + key, compute)

    def embed_file(self, path: str | os.PathLike, modality: str | None = None) -> tuple[str, np.ndarray]:
        """``(modality, embedding)`` of one file or folder; an unchanged file already embedded
        is neither read nor embedded again."""
        real = self.check_item(path)

        def compute():
            sample = self.load(real, modality)
            return sample.modality, self.embed(sample)

        key = self._embedding_key(real, modality)
        return compute() if key is None else self._cached(self._embeddings, ("file",) + key, compute)

    def label_vectors(self, modality: str, labels: list[str], templates: list[str] | None = None,
                      mode: str = "ensemble") -> np.ndarray:
        """Ensembled label embeddings ``[L, D]`` (:func:`m3bind.zeroshot.label_embeddings`),
        remembered per model, modality, labels, templates and mode."""
        from m3bind.zeroshot import label_embeddings

        model = self.model
        key = (str(getattr(model, "model_id", "")), modality, tuple(labels), tuple(templates or ()), mode)
        return self._cached(self._label_vectors, key,
                            lambda: label_embeddings(model, modality, labels, templates or None, mode))

    def zeroshot(self, sample, labels: list[str] | None = None,
                 templates: list[str] | None = None, mode: str = "ensemble") -> list[tuple[str, float]]:
        """Zero-shot scores (softmax, best first) with :func:`m3bind.zeroshot.classify`."""
        return self.zeroshot_vector(sample.modality, self.embed(sample), labels, templates, mode)

    def zeroshot_vector(self, modality: str, embedding: np.ndarray, labels: list[str] | None = None,
                        templates: list[str] | None = None,
                        mode: str = "ensemble") -> list[tuple[str, float]]:
        """Zero-shot scores of an embedding of ``modality`` (see :meth:`zeroshot`)."""
        from m3bind.zeroshot import classify

        labels = [x for x in (labels or []) if x] or list(get_spec(modality).labels)
        if len(set(labels)) < 2:
            raise ConfigError("give at least two different labels")
        for t in templates or []:
            if "{}" not in t:
                raise ConfigError(f"prompt template without {{}} placeholder: {t!r}")
        text = self.label_vectors(modality, labels, list(templates) if templates else None, mode)
        scores = classify(self.model, embedding, labels=labels, modality=modality, label_vectors=text)
        return [(str(lbl), float(s)) for lbl, s in scores]

    # ------------------------------------------------------------ prompt sets
    def _prompt_store(self) -> Path:
        return Path(self.prompt_dir) / PROMPT_FILE

    def prompt_sets(self) -> dict[str, dict[str, Any]]:
        """All saved prompt sets: ``name -> {"modality", "labels", "templates"}``."""
        f = self._prompt_store()
        if not f.is_file():
            return {}
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable prompt store %s: %s", f, e)
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def save_prompt_set(self, name: str, modality: str, labels: list[str],
                        templates: list[str]) -> None:
        """Save (or replace) a named prompt set."""
        name = (name or "").strip()
        if not _PROMPT_NAME.match(name):
            raise ConfigError("prompt set name: 1-64 letters, digits, spaces, '.', '-' or '_'")
        if modality not in MODALITIES:
            raise ConfigError(f"unknown modality {modality!r}")
        sets = self.prompt_sets()
        sets[name] = {"modality": modality, "labels": list(labels), "templates": list(templates)}
        atomic_write_text(self._prompt_store(), json.dumps(sets, indent=2, ensure_ascii=False))

    # ----------------------------------------------------------------- search
    def search(self, *, sample=None, text: str | None = None, path: str | os.PathLike | None = None,
               target: str, k: int = 10) -> list[dict[str, Any]]:
        """Nearest catalogue items of modality ``target`` to a sample, a file or a text query
        (exactly one of ``sample``, ``path`` and ``text``).

        Goes through :func:`data_registry.search.search` (the CLI's search), so the results are
        the CLI's JSON rows (``path, modality, score, patient, study`` and what it adds).
        """
        from data_registry.search import TEXT_PREFIX
        from data_registry.search import search as archive_search

        if target not in MODALITIES:
            raise ConfigError(f"unknown target modality {target!r}")
        given = [x for x in (sample, path, (text or "").strip() or None) if x is not None]
        if len(given) != 1:
            raise ConfigError("give either a query file or a query text, not both")
        k = max(1, min(int(k), 100))
        catalog = self.catalog()
        model = self.model
        vector = None
        if sample is not None:
            query, modality, vector = str(self.check_path(sample.path)), sample.modality, self.embed(sample)
        elif path is not None:
            query = str(self.check_path(path))
            modality, vector = self.embed_file(query)
        else:
            query, modality = TEXT_PREFIX + text.strip(), None
        return archive_search(catalog, model, query, target, k, modality=modality,
                              query_vector=vector)["results"]

    # ---------------------------------------------------------------- archive
    def index(self, root: str | os.PathLike | None) -> dict[str, Any]:
        """Index ``root`` (default: the archive root) into the catalogue."""
        from app.web import archive as archive_api

        root = Path(root) if root else self.archive_root
        if root is None:
            raise ConfigError("no folder to index: give one or start with --archive ROOT")
        real = self.check_path(root)
        if not real.is_dir():
            raise UnsupportedFormat("not a folder", str(root))
        if not self.catalog_url:
            raise NotReady("no catalogue configured: start with --catalog URL")
        return archive_api.index(real, self.catalog_url, self.model, workers=self.index_workers,
                                 keep_phi=self.keep_phi)


def _upload_name(p: Path) -> str:
    """The original file name of an upload (Gradio keeps it as the last path part)."""
    return p.name
