"""``m3bind serve``: the clinical exploration app (Gradio) on localhost.

Safe defaults: it binds to 127.0.0.1; binding to any other address needs ``--auth``; uploads
are limited to ``--max-upload-mb``; the browser can open files only inside ``--archive`` and
Gradio's upload folder. ``--demo`` fills in the demo model, archive and catalogue under
``runs/demo/``, builds the demo archive when missing and indexes it (with a progress bar)
before the app opens. Without a trained model the app still opens, with a notice.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

from app.cli import add_common
from m3bind.errors import ConfigError, M3BindError

log = logging.getLogger(__name__)

DEMO_DIR = Path("runs/demo")
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


def add_parser(subparsers) -> None:
    """Register ``m3bind serve``."""
    p = subparsers.add_parser("serve", help="open the clinical exploration app in the browser",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default with --demo: runs/demo/model)")
    p.add_argument("--catalog", default=None,
                   help="catalogue URL or SQLite file (default with --demo: runs/demo/catalog.db)")
    p.add_argument("--archive", default=None,
                   help="archive root the browser may open files from and the Archive tab indexes")
    p.add_argument("--demo", action="store_true",
                   help="use runs/demo/{model,archive,catalog.db}; build and index the demo archive if missing")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (non-local needs --auth)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="require this login (or set M3BIND_AUTH)")
    p.add_argument("--max-upload-mb", type=float, default=512.0, help="upload size limit in MB")
    p.add_argument("--show-phi", action="store_true",
                   help="show identifying metadata (names, dates of birth); off by default")
    p.add_argument("--prompt-dir", default=None,
                   help="folder of saved prompt sets (default ~/.config/m3bind/prompts)")
    p.add_argument("--no-index", action="store_true", help="with --demo: do not index on start")
    add_common(p)
    p.set_defaults(func=run)


def is_local(host: str) -> bool:
    """Whether ``host`` is a loopback address or name."""
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``user:pass`` as a tuple; ConfigError when malformed."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth must be USER:PASS")
    return user, password


def check_binding(host: str, auth: tuple[str, str] | None) -> None:
    """Refuse to serve beyond localhost without a login."""
    if not is_local(host) and auth is None:
        raise ConfigError(f"refusing to bind {host} without --auth USER:PASS (localhost needs none)")


def catalog_url(text: str | None) -> str | None:
    """A SQLAlchemy URL from ``--catalog`` (a plain path means a SQLite file)."""
    if not text:
        return None
    return text if "://" in text else f"sqlite:///{Path(text).expanduser().resolve()}"


def index_demo(services) -> None:
    """Index the demo archive into the catalogue with a terminal progress bar (first start)."""
    from app.web import archive as archive_api

    if services.model_notice():
        log.warning("not indexing the demo archive: %s", services.model_notice())
        return
    try:
        catalog = services.catalog()
        key = archive_api.model_key(services.model)
        if archive_api.item_count(catalog) > 0 and key in catalog.model_keys():
            return  # indexed with this model already (a new model re-embeds incrementally)
    except M3BindError as e:
        log.warning("catalogue unavailable: %s", e.line())
        return
    log.warning("indexing the demo archive %s (first start)", services.archive_root)
    res = services.index(None)  # the indexer's tqdm bar shows progress
    log.warning("demo archive indexed: %s", res)


def run(args: argparse.Namespace) -> int:
    """Start the app; blocks until interrupted."""
    from app.web.app import launch
    from app.web.state import Services

    auth = parse_auth(args.auth or os.environ.get("M3BIND_AUTH"))
    check_binding(args.host, auth)
    model, archive, catalog = args.model, args.archive, args.catalog
    if args.demo:
        from app.demo import prepare_archive

        model = model or str(DEMO_DIR / "model")
        archive = archive or str(DEMO_DIR / "archive")
        catalog = catalog or str(DEMO_DIR / "catalog.db")
        prepare_archive(archive)
    services = Services(model, catalog_url(catalog), archive, keep_phi=args.show_phi,
                        prompt_dir=args.prompt_dir, max_upload_mb=args.max_upload_mb)
    if services.archive_root is None and services.catalog_url:
        try:  # the archive the catalogue describes is the one the browser may open
            root = services.catalog().root()
            services.archive_root = Path(root).resolve() if root else None
        except M3BindError as e:
            log.warning("catalogue unavailable: %s", e.line())
    if notice := services.model_notice():
        log.warning("%s — the app opens without zero-shot and search", notice)
    if args.demo and not args.no_index:
        index_demo(services)
    print(f"m3bind app on http://{args.host}:{args.port}  (Ctrl+C to stop)", flush=True)
    launch(services, host=args.host, port=args.port, auth=auth, max_upload_mb=args.max_upload_mb,
           block=True, quiet=True)
    return 0
