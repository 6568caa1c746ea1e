"""The Gradio clinical exploration app: Explore, Zero-shot, Search, Archive, Embedding map.

:func:`build_app` lays out the page and wires each control to a callback; the callbacks go
through :class:`app.web.state.Services` and :mod:`app.web.views`. Every callback is wrapped by
:func:`guarded`, so a bad file or a missing model shows the one-line
:class:`~m3bind.errors.M3BindError` text in the page instead of a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import gradio as gr

from app.web import api, views
from app.web import archive as archive_api
from app.web.embedding_map import draw_map
from app.web.state import NotReady, Services, upload_dir
from m3bind.errors import M3BindError
from m3bind.modalities import MODALITIES, SPECS, get_spec

log = logging.getLogger(__name__)

AUTO = "auto"
CSS = """
#notice {border-left: 4px solid #d97706; padding-left: 8px;}
#viewer img {background: #000;}
#meta table {width: 100%; border-collapse: collapse; font-size: 0.85em;}
#meta td {padding: 3px 6px; border-bottom: 1px solid #e5e7eb; vertical-align: top;
          overflow-wrap: anywhere;}
#meta td:first-child {color: #555; white-space: nowrap; width: 38%;}
.m3b-small {font-size: 0.9em; color: #555;}
"""
MODALITY_CHOICES = [(f"{SPECS[m].title} ({m})", m) for m in MODALITIES]


def user_line(e: M3BindError) -> str:
    """The error's one line; an upload is named by its file name, not Gradio's cache path."""
    if e.path:
        p = Path(e.path)
        if upload_dir() in p.parents:
            return f"{e.what} ({p.name})"
    return e.line()


def guarded(fn):
    """Turn user-facing errors into an in-page message (``gr.Error``), never a crash."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except M3BindError as e:
            raise gr.Error(user_line(e), print_exception=False) from None
        except Exception as e:
            log.exception("callback %s failed", fn.__name__)
            raise gr.Error(f"{type(e).__name__}: {' '.join(str(e).split())}"[:300],
                           print_exception=False) from None

    return wrapper


def _file_paths(files: Any) -> list[str]:
    """Paths of a ``gr.File`` value (one file, several, or ``None``)."""
    if not files:
        return []
    files = files if isinstance(files, list) else [files]
    return [str(getattr(f, "name", f)) for f in files]


def _split_labels(text: str) -> list[str]:
    return [x.strip() for x in (text or "").replace("\n", ",").split(",") if x.strip()]


def _split_lines(text: str) -> list[str]:
    return [x.strip() for x in (text or "").splitlines() if x.strip()]


def _describe(sample) -> str:
    m = sample.modality
    name = Path(sample.path).name
    if not m:
        return f"**{name}** — modality unknown"
    guess = " (best guess — set the modality if wrong)" if sample.modality_guess else ""
    return f"**{name}** — {SPECS[m].title}{guess}"


def _title(m: str) -> str:
    return f"{SPECS[m].title} ({m})" if m in SPECS else m


def _modality_order(m: str) -> int:
    return MODALITIES.index(m) if m in MODALITIES else len(MODALITIES)


def build_app(services: Services) -> gr.Blocks:
    """The app's ``gr.Blocks`` over ``services``."""
    with gr.Blocks(title="m3bind — clinical exploration", analytics_enabled=False) as demo:
        sample_state = gr.State(None, time_to_live=3600)  # the Sample open in Explore
        hits_state = gr.State([])  # last search results (JSON dicts)
        picked_state = gr.State(None)  # path picked in Search / Archive to open in Explore
        path_state = gr.State(None)  # path of the item open in Explore (reopened on a modality change)

        gr.Markdown("## m3bind — multimodal study explorer\n"
                    "<span class='m3b-small'>Research software. Scores come from an embedding "
                    "model and are not a diagnosis. The demo model is trained on simulated "
                    "data.</span>")
        notice = gr.Markdown("", elem_id="notice", visible=False)

        with gr.Tabs(selected="explore") as tabs:
            # ------------------------------------------------------------ Explore
            with gr.Tab("Explore", id="explore"), gr.Row():
                with gr.Column(scale=1, min_width=280):
                    upload = gr.File(label="Upload a file (or all files of a DICOM series / "
                                           "a WFDB .hea + .dat pair)",
                                     file_count="multiple", elem_id="upload")
                    modality_in = gr.Dropdown([("auto-detect", AUTO)] + MODALITY_CHOICES,
                                              value=AUTO, label="Modality",
                                              info="for PNG/JPEG/TIFF, which carry none")
                    archive_pick = gr.Dropdown([], label="…or open an item of the archive",
                                               allow_custom_value=False, elem_id="archive-pick")
                    gr.Markdown("**Key metadata**")
                    meta = gr.HTML("", elem_id="meta")
                with gr.Column(scale=3):
                    item_md = gr.Markdown("Upload a file or pick one from the archive.",
                                          elem_id="item")
                    viewer = gr.Image(label="Viewer", show_label=False, interactive=False,
                                      type="numpy", height=600, elem_id="viewer")
                    with gr.Row():
                        centre = gr.Slider(0, 1, value=0.5, label="Window centre (level)",
                                           visible=False, elem_id="wl-centre")
                        width = gr.Slider(0, 1, value=1, label="Window width",
                                          visible=False, elem_id="wl-width")
                    with gr.Row():
                        slice_sl = gr.Slider(1, 2, value=1, step=1, label="Slice",
                                             visible=False, elem_id="slice")
                        preset = gr.Radio(list(views.WINDOW_PRESETS), value=views.AUTO_WINDOW,
                                          label="Window preset", visible=False,
                                          elem_id="preset")
                    tiles = gr.Gallery(label="Tissue tiles (click one to zoom)", columns=6,
                                       height=360, visible=False, object_fit="contain",
                                       fit_columns=False, elem_id="tiles")

            # ---------------------------------------------------------- Zero-shot
            with gr.Tab("Zero-shot", id="zeroshot"):
                zs_item = gr.Markdown("Open an item in Explore first.")
                with gr.Row():
                    with gr.Column(scale=2):
                        zs_labels = gr.Textbox(label="Labels (comma-separated)", lines=2,
                                               elem_id="zs-labels")
                        zs_templates = gr.Textbox(label="Prompt templates (one per line, {} = label)",
                                                  lines=4, elem_id="zs-templates")
                        with gr.Row():
                            zs_run = gr.Button("Classify", variant="primary", elem_id="zs-run")
                            zs_reset = gr.Button("Default labels and prompts", elem_id="zs-reset")
                        zs_mode = gr.Radio(["ensemble", "naive", "expert"], value="ensemble",
                                           label="Prompting",
                                           info="ensemble: mean over the templates; naive: the "
                                                "label alone; expert: the modality's descriptions "
                                                "of each finding")
                        with gr.Accordion("Prompt sets (saved per user)", open=False, elem_id="ps"):
                            with gr.Row():
                                ps_name = gr.Textbox(label="Name", scale=2, elem_id="ps-name")
                                ps_save = gr.Button("Save", scale=1, elem_id="ps-save")
                            with gr.Row():
                                ps_pick = gr.Dropdown([], label="Saved sets", scale=2, elem_id="ps-pick")
                                ps_load = gr.Button("Load", scale=1, elem_id="ps-load")
                    with gr.Column(scale=2):
                        zs_out = gr.Label(label="Zero-shot scores", show_heading=False,
                                          elem_id="zs-out")
                        gr.Markdown("<span class='m3b-small'>Relative scores among the labels "
                                    "given (softmax, they add up to 100%): which label's "
                                    "prompts the image is closest to — not the probability "
                                    "of a disease.</span>")

            # ------------------------------------------------------------- Search
            with gr.Tab("Search", id="search"):
                s_item = gr.Markdown("Open an item in Explore to find similar items, or type a query.")
                with gr.Row():
                    s_target = gr.Radio(MODALITY_CHOICES, value="ecg", label="Find items of modality",
                                        elem_id="s-target")
                    s_k = gr.Slider(1, 24, value=8, step=1, label="How many", elem_id="s-k")
                with gr.Row():
                    s_similar = gr.Button("Find similar to the Explore item", variant="primary",
                                          elem_id="s-similar")
                    s_text = gr.Textbox(label="…or a text query", placeholder="e.g. atrial fibrillation",
                                        scale=2, elem_id="s-text")
                    s_text_go = gr.Button("Search text", elem_id="s-text-go")
                s_gallery = gr.Gallery(label="Results, best first (click one to select it)", columns=4,
                                       height=380, object_fit="contain", preview=False,
                                       allow_preview=True, fit_columns=False, elem_id="s-gallery")
                s_table = gr.Dataframe(headers=["rank", "similarity", "modality", "patient", "study",
                                                "date", "file"],
                                       label="Results (click a row to select it)", interactive=False,
                                       elem_id="s-table")
                with gr.Row():
                    s_picked = gr.Markdown("")
                    s_open = gr.Button("Open selected result in Explore", elem_id="s-open")

            # ------------------------------------------------------------ Archive
            with gr.Tab("Archive", id="archive"):
                with gr.Row():
                    a_root = gr.Textbox(value=str(services.archive_root or ""), scale=3,
                                        label="Folder to index (inside the archive root)")
                    a_index = gr.Button("Index", variant="primary", scale=1, elem_id="a-index")
                a_result = gr.Markdown("")
                with gr.Row():
                    a_counts = gr.Dataframe(headers=["modality", "items"], label="Items per modality",
                                            interactive=False)
                    a_failed = gr.Dataframe(headers=["path", "error"], label="Failures",
                                            interactive=False, wrap=True)
                a_patient = gr.Dropdown([], label="Patient", elem_id="a-patient")
                a_items = gr.Dataframe(headers=["study", "date", "modality", "path"],
                                       label="Studies and items (click a row, then open it)",
                                       interactive=False, elem_id="a-items")
                with gr.Row():
                    a_picked = gr.Markdown("")
                    a_open = gr.Button("Open selected item in Explore")

            # ------------------------------------------------------ Embedding map
            with gr.Tab("Embedding map", id="map"):
                with gr.Row():
                    m_colour = gr.Radio(["modality", "zero-shot label"], value="modality",
                                        label="Colour by")
                    m_method = gr.Radio(["PCA", "t-SNE"], value="PCA", label="Projection")
                    m_draw = gr.Button("Draw", variant="primary", elem_id="m-draw")
                m_plot = gr.Plot(label="Archive items in the shared space (2D projection)",
                                 elem_id="m-plot")
                m_note = gr.Markdown("")

        api.add_endpoints(services)

        # =============================================================== callbacks
        explore_outputs = [path_state, sample_state, item_md, viewer, centre, width, slice_sl,
                           preset, tiles, meta, zs_item, zs_labels, zs_templates, s_item]

        def _explore_updates(path, sample) -> tuple:
            c = views.controls_for(sample)
            image = views.render(sample, centre=c.centre if c.window_level else None,
                                 width=c.width if c.window_level else None,
                                 slice_index=c.slice if c.slices else None, preset=c.preset)
            step = float(f"{(c.hi - c.lo) / 500:.1g}")
            spec = get_spec(sample.modality) if sample.modality else None
            described = _describe(sample)
            real, root = Path(services.check_path(path)), services.archive_root
            source = (f"archive: `{real.relative_to(root)}`" if root and root in real.parents
                      else "uploaded")
            return (
                str(path), sample, f"{described} · {source}", image,
                gr.update(visible=c.window_level, minimum=c.lo, maximum=c.hi, value=c.centre, step=step),
                gr.update(visible=c.window_level, minimum=step, maximum=2 * (c.hi - c.lo),
                          value=c.width, step=step),
                gr.update(visible=c.slices > 1, minimum=1, maximum=max(c.slices, 2),
                          value=c.slice + 1, label=f"Slice (1-{c.slices})"),
                gr.update(visible=bool(c.presets), choices=list(c.presets), value=c.preset),
                gr.update(visible=c.tiles, value=views.tile_gallery(sample) if c.tiles else None),
                views.metadata_html(sample),
                f"Current item: {described}",
                ", ".join(spec.labels) if spec else "",
                "\n".join(spec.templates) if spec else "",
                f"Query: {described}",
            )

        @guarded
        def open_upload(files, modality):
            paths = _file_paths(files)
            if not paths:
                return (gr.update(),) * len(explore_outputs)
            try:
                path = services.assemble(paths)
                sample = services.load(path, None if modality == AUTO else modality)
            except M3BindError as e:
                # the item on screen stays as it was (no error overlay over it); the toast
                # names the file that could not be opened
                gr.Warning(f"not opened: {user_line(e)}", title="Could not open the upload")
                return (gr.update(),) * len(explore_outputs)
            return _explore_updates(path, sample)

        @guarded
        def open_path(path, modality=AUTO):
            if not path:
                return (gr.update(),) * len(explore_outputs)
            sample = services.load(path, None if modality in (None, AUTO) else modality)
            return _explore_updates(path, sample)

        @guarded
        def redraw(sample, c, w, s, p):
            if sample is None:
                return gr.update()
            return views.render(sample, centre=c, width=w, slice_index=int(s) - 1, preset=p)

        # each upload opens what was just sent (the box is emptied after, so files never pile up)
        upload.upload(open_upload, [upload, modality_in], explore_outputs).then(
            lambda: None, None, upload, show_progress="hidden")
        modality_in.input(open_path, [path_state, modality_in], explore_outputs)
        archive_pick.input(open_path, [archive_pick, modality_in], explore_outputs)
        view_inputs = [sample_state, centre, width, slice_sl, preset]
        for ctl in (centre, width, slice_sl):
            ctl.release(redraw, view_inputs, viewer, show_progress="hidden")
        preset.input(redraw, view_inputs, viewer, show_progress="hidden")

        # -------------------------------------------------------------- zero-shot
        @guarded
        def classify(sample, labels, templates, mode):
            if sample is None:
                raise gr.Error("open an item in Explore first", print_exception=False)
            scores = services.zeroshot(sample, _split_labels(labels), _split_lines(templates), mode=mode)
            return {lbl: s for lbl, s in scores}

        @guarded
        def reset_prompts(sample):
            if sample is None or not sample.modality:
                return gr.update(), gr.update()
            spec = get_spec(sample.modality)
            return ", ".join(spec.labels), "\n".join(spec.templates)

        @guarded
        def save_set(name, sample, labels, templates):
            if sample is None or not sample.modality:
                raise gr.Error("open an item first: a prompt set belongs to a modality",
                               print_exception=False)
            services.save_prompt_set(name, sample.modality, _split_labels(labels), _split_lines(templates))
            gr.Info(f"prompt set '{name.strip()}' saved")
            return gr.update(choices=sorted(services.prompt_sets()), value=name.strip())

        @guarded
        def load_set(name):
            sets = services.prompt_sets()
            if name not in sets:
                raise gr.Error("choose a saved prompt set", print_exception=False)
            ps = sets[name]
            return ", ".join(ps.get("labels", [])), "\n".join(ps.get("templates", []))

        zs_run.click(classify, [sample_state, zs_labels, zs_templates, zs_mode], zs_out)
        zs_reset.click(reset_prompts, [sample_state], [zs_labels, zs_templates])
        ps_save.click(save_set, [ps_name, sample_state, zs_labels, zs_templates], ps_pick)
        ps_load.click(load_set, [ps_pick], [zs_labels, zs_templates])

        # ----------------------------------------------------------------- search
        def _rel(path: str) -> str:
            """A result's path relative to the archive root (shorter to read)."""
            root = services.archive_root
            p = Path(path)
            return str(p.relative_to(root)) if root and root in p.parents else str(p)

        def _show_hits(hits):
            gallery, rows = [], []
            for i, h in enumerate(hits, 1):
                patient, study = archive_api.short_key(h["patient"]), archive_api.short_key(h["study"])
                caption = (f"#{i} · similarity {h['score']:.3f} · {h['modality']} · "
                           f"patient {patient or '—'} · study {study or '—'}")
                try:
                    img = views.thumbnail(services.load(h["path"], h["modality"]))
                except M3BindError as e:  # one unreadable result does not hide the others
                    log.warning("no preview for %s: %s", h["path"], e.line())
                    img = None
                if img is not None:
                    gallery.append((img, caption))
                rows.append([i, round(h["score"], 4), h["modality"], patient, study,
                             h.get("study_date") or "", _rel(h["path"])])
            if not hits:
                gr.Warning("no results: the catalogue holds no items of this modality")
            return hits, gallery, rows, ""

        @guarded
        def search_similar(sample, target, k):
            if sample is None:
                raise gr.Error("open an item in Explore first (or type a text query)",
                               print_exception=False)
            return _show_hits(services.search(sample=sample, target=target, k=int(k)))

        @guarded
        def search_text(text, target, k):
            if not (text or "").strip():
                raise gr.Error("type a text query", print_exception=False)
            return _show_hits(services.search(text=text, target=target, k=int(k)))

        def pick_hit(hits, evt: gr.SelectData):
            i = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            if not hits or i is None or not 0 <= i < len(hits):
                return None, ""
            h = hits[i]
            return h["path"], f"Selected #{i + 1}: `{_rel(h['path'])}`"

        @guarded
        def open_picked(path):
            if not path:
                raise gr.Error("select a result first", print_exception=False)
            return (*open_path(path), gr.Tabs(selected="explore"))

        search_outputs = [hits_state, s_gallery, s_table, s_picked]
        s_similar.click(search_similar, [sample_state, s_target, s_k], search_outputs)
        s_text_go.click(search_text, [s_text, s_target, s_k], search_outputs)
        s_text.submit(search_text, [s_text, s_target, s_k], search_outputs)
        s_gallery.select(pick_hit, [hits_state], [picked_state, s_picked])
        s_table.select(pick_hit, [hits_state], [picked_state, s_picked])
        s_open.click(open_picked, [picked_state], explore_outputs + [tabs])

        # ---------------------------------------------------------------- archive
        @guarded
        def refresh_archive():
            try:
                cat = services.catalog()
            except NotReady as e:
                return [], [], gr.update(choices=[]), gr.update(choices=[]), f"*{e.line()}*"
            counts = archive_api.counts(cat)
            failed = archive_api.failures(cat)
            items = archive_api.items(cat, root=services.archive_root)
            by_patient: dict[str, list[str]] = {}
            for i in items:
                if i["patient"]:
                    by_patient.setdefault(i["patient"], []).append(i["modality"])
            patients = [((f"{p} — {len(ms)} item{'s' if len(ms) > 1 else ''}: "
                          f"{', '.join(sorted(set(ms), key=_modality_order))}"), p)
                        for p, ms in sorted(by_patient.items())]
            picks = [(archive_api.item_label(i), i["path"]) for i in items]
            return ([[_title(m), n] for m, n in counts.items()],
                    [[f["path"], f["error"]] for f in failed],
                    gr.update(choices=patients), gr.update(choices=picks),
                    f"{sum(counts.values())} items, {len(failed)} failures")

        archive_outputs = [a_counts, a_failed, a_patient, archive_pick, a_result]

        @guarded
        def run_index(root, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - Gradio's idiom
            progress(0, desc="scanning the folder")
            res = services.index(root or None)
            summary = (f"**Indexed:** {res.get('added', 0)} added, {res.get('skipped', 0)} unchanged, "
                       f"{res.get('failed', 0)} failed, {res.get('total', 0)} in total")
            out = refresh_archive()
            return (*out[:4], summary)

        @guarded
        def patient_items(patient):
            if not patient:
                return []
            items = archive_api.items(services.catalog(), root=services.archive_root, patient=patient)
            return [[i.get("study") or "", i.get("date") or "", i["modality"], _rel(i["path"])]
                    for i in items]

        def pick_row(rows, evt: gr.SelectData):
            try:
                r = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
                path = rows.iloc[r]["path"] if hasattr(rows, "iloc") else rows[r][3]
            except (IndexError, KeyError, TypeError):
                return None, ""
            return path, f"Selected: `{path}`"  # relative to the archive root: Services resolves it

        a_index.click(run_index, [a_root], archive_outputs)
        a_patient.change(patient_items, [a_patient], a_items)
        a_items.select(pick_row, [a_items], [picked_state, a_picked])
        a_open.click(open_picked, [picked_state], explore_outputs + [tabs])

        # ---------------------------------------------------------- embedding map
        @guarded
        def draw(colour, method):
            fig, note = draw_map(services, colour_by=colour, method=method)
            return fig, note

        m_draw.click(draw, [m_colour, m_method], [m_plot, m_note])

        # ------------------------------------------------------------ page load
        def on_load():
            notes = [n for n in (services.model_notice(), services.catalog_notice()) if n]
            text = "\n\n".join(f"**Notice:** {n}" for n in notes)
            try:
                arch = refresh_archive()
            except gr.Error:
                arch = ([], [], gr.update(), gr.update(), "")
            sets = sorted(services.prompt_sets())
            return (gr.update(value=text, visible=bool(notes)), *arch, gr.update(choices=sets))

        demo.load(on_load, None, [notice, *archive_outputs, ps_pick])
    return demo


def launch(services: Services, *, host: str = "127.0.0.1", port: int = 7860,
           auth: tuple[str, str] | None = None, max_upload_mb: float = 512.0,
           block: bool = True, quiet: bool = False):
    """Build and start the app; returns ``(demo, url)`` (with ``block=False``)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    services.model_notice()  # load the model now, not on the first page view
    demo = build_app(services)
    demo.queue(default_concurrency_limit=2)
    # The archive is read through the path check of Services only, never served as raw files.
    blocked = None
    if services.archive_root:
        up = Path(gr.utils.get_upload_folder()).resolve()
        if services.archive_root != up and services.archive_root not in up.parents:
            blocked = [str(services.archive_root)]
    with _patient_localhost_check():
        _, url, _ = demo.launch(
            server_name=host, server_port=port, auth=auth, share=False, inbrowser=False,
            max_file_size=f"{max_upload_mb:g}mb", blocked_paths=blocked, run_history=False,
            prevent_thread_lock=not block, show_error=True, quiet=quiet, css=CSS, ssr_mode=False,
            mcp_server=False, footer_links=["api"],
        )
    return demo, url


@contextlib.contextmanager
def _patient_localhost_check():
    """Give Gradio's start-up probe of the local URL more time.

    ``launch`` checks that the server answers within 3 s and otherwise refuses to start unless
    ``share=True`` (a public tunnel, which we never want). On a busy machine the first answer
    can take longer, so the probe is retried with a longer timeout.
    """
    from gradio import networking

    original = networking.url_ok

    def url_ok(url: str) -> bool:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = httpx.head(url, timeout=10, verify=False)
                if r.status_code in (200, 401, 301, 302, 303, 307, 308):
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return False

    networking.url_ok = url_ok
    try:
        yield
    finally:
        networking.url_ok = original
