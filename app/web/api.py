"""The two API endpoints of DESIGN.md, for ``gradio_client``.

``/zeroshot(file, labels)`` returns ``{"modality", "labels": [{"label", "score"}]}`` (best
first) and ``/search(query_file, query_text, target_modality, k)`` returns
``{"results": [{"path", "modality", "score", "patient", "study"}]}`` — the same JSON text as
``m3bind zeroshot --json`` and ``m3bind search --json`` print (``json.loads`` it). It is sent
as text, not as a JSON object, because ``gradio_client`` treats any returned dict with a
``"path"`` key as a file to download (and would fetch — or fail on — each result's path).
Errors reach the client as a ``gr.Error`` carrying the one-line
:class:`~m3bind.errors.M3BindError` text.

Example:
    >>> from gradio_client import Client, handle_file      # doctest: +SKIP
    >>> c = Client("http://127.0.0.1:7860")
    >>> json.loads(c.predict(file=handle_file("ecg.dcm"), labels="afib, normal",
    ...                      api_name="/zeroshot"))
    {'modality': 'ecg', 'labels': [{'label': ..., 'score': ...}, ...]}
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import gradio as gr

from app.web.state import Services
from m3bind.errors import ConfigError, M3BindError

log = logging.getLogger(__name__)


def _path(file: Any) -> str | None:
    if not file:
        return None
    return str(getattr(file, "name", None) or (file.get("path") if isinstance(file, dict) else file))


def zeroshot_json(services: Services, file: Any, labels: str) -> dict[str, Any]:
    """The ``/zeroshot`` payload for one uploaded file and comma-separated labels."""
    path = _path(file)
    if not path:
        raise ConfigError("no file given")
    modality, embedding = services.embed_file(services.assemble([path]))
    wanted = [x.strip() for x in (labels or "").split(",") if x.strip()]
    scores = services.zeroshot_vector(modality, embedding, wanted or None)
    return {"modality": modality,
            "labels": [{"label": lbl, "score": float(s)} for lbl, s in scores]}


def search_json(services: Services, query_file: Any, query_text: str, target_modality: str,
                k: float) -> dict[str, Any]:
    """The ``/search`` payload; exactly one of ``query_file`` and ``query_text`` is given."""
    path = _path(query_file)
    text = (query_text or "").strip()
    if bool(path) == bool(text):
        raise ConfigError("give either query_file or query_text (the other empty)")
    hits = services.search(path=services.assemble([path]) if path else None, text=text or None,
                           target=target_modality, k=int(k or 10))
    return {"results": hits}


def _text(payload: dict[str, Any]) -> str:
    """The payload as the CLI prints it (``app.cli.emit``)."""
    return json.dumps(payload, ensure_ascii=False)


def _guard(fn):
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except M3BindError as e:
            from app.web.app import user_line

            raise gr.Error(user_line(e), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:
            log.exception("API call failed")
            raise gr.Error(f"{type(e).__name__}: {' '.join(str(e).split())}"[:300],
                           print_exception=False) from None

    return wrapper


def add_endpoints(services: Services) -> None:
    """Add the hidden components and listeners of ``/zeroshot`` and ``/search`` to the open Blocks."""
    with gr.Column(visible=False):
        z_file = gr.File(label="file")
        z_labels = gr.Textbox(label="labels")
        z_out = gr.Textbox(label="zeroshot")
        z_btn = gr.Button("zeroshot")
        q_file = gr.File(label="query_file")
        q_text = gr.Textbox(label="query_text")
        q_target = gr.Textbox(label="target_modality")
        q_k = gr.Number(value=10, precision=0, label="k")
        q_out = gr.Textbox(label="search")
        q_btn = gr.Button("search")

    # the client names the parameters after these functions' arguments
    def zeroshot(file, labels):
        """Zero-shot labels of one file; ``labels`` comma-separated (empty: the modality's defaults)."""
        return _text(zeroshot_json(services, file, labels))

    def search(query_file, query_text, target_modality, k):
        """Archive items of ``target_modality`` nearest to a file or a text (one of them empty)."""
        return _text(search_json(services, query_file, query_text, target_modality, k))

    z_btn.click(_guard(zeroshot), [z_file, z_labels], z_out, api_name="zeroshot")
    q_btn.click(_guard(search), [q_file, q_text, q_target, q_k], q_out, api_name="search")
