"""``report.md``: the evaluation report rendered from ``report.json``'s dict.

Tables follow the papers: zero-shot results with stages as rows and modalities as columns
(M3Bind Table 1), few-shot mean ± std per K (M3Bind Table 2), item/text Recall@K with RSUM
(SeLIP), cross-modal precision@K per modality pair (MEDBind). Headline numbers carry their
bootstrap 95% interval in brackets. Percentages throughout, except RSUM (sum of recalls in %).
"""

from __future__ import annotations

from typing import Any, Iterable

from m3bind.modalities import MODALITIES, SPECS

DASH = "–"


def pct(v: Any, ci: Any = None) -> str:
    """``v`` as a percentage with one decimal, and ``[lo, hi]`` when an interval is given."""
    if v is None:
        return DASH
    s = f"{100 * float(v):.1f}"
    if ci and len(ci) == 2 and ci[0] is not None and ci[1] is not None:
        s += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return s


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _get(d: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _ci(task: dict | None, metric: str) -> Any:
    return _get(task or {}, "ci95_by_metric", metric)


def _modalities(metrics: dict, task: str) -> list[str]:
    return [m for m in MODALITIES if any(_get(metrics[s], m, task) for s in metrics)]


def _pairs(metrics: dict) -> list[str]:
    seen = {k for s in metrics for k in metrics[s] if "->" in k}
    order = {m: i for i, m in enumerate(MODALITIES)}
    return sorted(seen, key=lambda p: tuple(order.get(x, 99) for x in p.split("->")))


def _zeroshot(report: dict) -> list[str]:
    metrics = report["metrics"]
    mods = _modalities(metrics, "zeroshot")
    if not mods:
        return []
    out = ["## 1. Zero-shot classification",
           "Stages as rows, modalities as columns (as M3Bind Table 1); prompt ensembles over "
           "the modality's templates. Cells: % [bootstrap 95% CI]. " + report.get("chance", "") + "."]
    header = ["stage"] + [SPECS[m].title for m in mods]
    for metric, title in (("accuracy", "Accuracy"), ("auc", "One-vs-rest AUC"),
                          ("macro_f1", "Macro F1")):
        rows = [[s] + [pct(_get(metrics[s], m, "zeroshot", metric),
                           _ci(_get(metrics[s], m, "zeroshot"), metric)) for m in mods]
                for s in metrics]
        if metric == "accuracy":
            rows.append(["chance"] + [pct(next((_get(metrics[s], m, "zeroshot", "chance")
                                                for s in metrics
                                                if _get(metrics[s], m, "zeroshot")), None))
                                      for m in mods])
        if metric == "auc":
            rows.append(["chance"] + ["50.0"] * len(mods))
        out += [f"**{title}**", table(header, rows)]
    rows = []
    for s in metrics:
        for key, name in (("zeroshot", "ensemble"), ("zeroshot_naive", "naive (FLAIR)"),
                          ("zeroshot_expert", "expert knowledge (FLAIR)")):
            if any(_get(metrics[s], m, key) for m in mods):
                rows.append([s, name] + [pct(_get(metrics[s], m, key, "accuracy"),
                                             _ci(_get(metrics[s], m, key), "accuracy"))
                                         for m in mods])
    out += ["**Prompt settings — accuracy** (naive: the label alone; expert: FLAIR's "
            "expert-knowledge descriptions; ensemble: template ensemble)",
            table(["stage", "prompts"] + [SPECS[m].title for m in mods], rows)]
    rows = [[s, SPECS[m].title, _get(metrics[s], m, "zeroshot", "n"),
             pct(_get(metrics[s], m, "zeroshot", "precision")),
             pct(_get(metrics[s], m, "zeroshot", "balanced_accuracy"))]
            for s in metrics for m in mods if _get(metrics[s], m, "zeroshot")]
    out += ["**Macro precision and balanced accuracy** (ensemble prompts)",
            table(["stage", "modality", "n", "precision", "balanced accuracy"], rows)]
    ml_mods = _modalities(metrics, "multilabel")
    if ml_mods:
        out.append("**Findings scored per label** (CheXpert-style multi-label; AUC of each "
                   "finding's prompt similarity; findings absent or universal in the test set "
                   "are left out)")
        for m in ml_mods:
            names = sorted({k[4:-1] for s in metrics for k in (_get(metrics[s], m, "multilabel") or {})
                            if k.startswith("auc[")})
            rows = [[s] + [pct(_get(metrics[s], m, "multilabel", f"auc[{n}]")) for n in names]
                    + [pct(_get(metrics[s], m, "multilabel", "mean_auc"),
                           _get(metrics[s], m, "multilabel", "ci95"))]
                    for s in metrics if _get(metrics[s], m, "multilabel")]
            out += [f"*{SPECS[m].title}*", table(["stage"] + names + ["mean AUC"], rows)]
    return out


def _fewshot(report: dict) -> list[str]:
    metrics = report["metrics"]
    mods = _modalities(metrics, "fewshot")
    if not mods:
        return []
    cols: list[tuple[str, str]] = []
    for m in mods:
        ks = sorted({v["shots"] for s in metrics for v in (_get(metrics[s], m, "fewshot") or {}).values()})
        cols += [(m, f"{k}-shot") for k in ks]
    rows = []
    for s in metrics:
        row = [s]
        for m, key in cols:
            v = _get(metrics[s], m, "fewshot", key)
            row.append(f"{100 * v['accuracy_mean']:.1f} ± {100 * v['accuracy_std']:.1f}" if v else DASH)
        rows.append(row)
    n_sets = next((v["n_sets"] for s in metrics for m in mods
                   for v in (_get(metrics[s], m, "fewshot") or {}).values()), None)
    out = ["## 2. Few-shot linear probes",
           f"Logistic regression on frozen embeddings, K labelled items per class, accuracy "
           f"mean ± std over {n_sets} random support sets (as M3Bind Table 2).",
           table(["stage"] + [f"{SPECS[m].title} {k}" for m, k in cols], rows)]
    if "fewshot" in report.get("plots", {}):
        out.append(f"![few-shot curves]({report['plots']['fewshot']})")
    return out


def _retrieval(report: dict) -> list[str]:
    metrics = report["metrics"]
    mods = _modalities(metrics, "retrieval")
    if not mods:
        return []
    ks = sorted(int(k[2:]) for k in next(_get(metrics[s], m, "retrieval") for s in metrics
                                         for m in mods if _get(metrics[s], m, "retrieval"))
                if k.startswith("R@"))
    rows = []
    for m in mods:
        for s in metrics:
            r = _get(metrics[s], m, "retrieval")
            if not r:
                continue
            rows.append([SPECS[m].title, s, f"{r['n_items']}/{r['n_texts']}"]
                        + [pct(r.get(f"R@{k}"), _ci(r, f"R@{k}")) for k in ks]
                        + [pct(r.get(f"t2i_R@{k}")) for k in ks]
                        + [f"{r['rsum']:.1f}" if r.get("rsum") is not None else DASH])
    return ["## 3. Item–report retrieval",
            "Against the distinct reports of the test items (a report several items share "
            "counts once, as SeLIP); item→report with 95% CI, report→item, RSUM = sum of the "
            "recalls in %.",
            table(["modality", "stage", "items/reports"] + [f"I→T R@{k}" for k in ks]
                  + [f"T→I R@{k}" for k in ks] + ["RSUM"], rows)]


def _cross_modal(report: dict) -> list[str]:
    metrics = report["metrics"]
    pairs = _pairs(metrics)
    if not pairs:
        return []
    stages = [s for s in metrics if any(p in metrics[s] for p in pairs)]
    sample = next(metrics[s][p]["cross_modal"] for s in stages for p in pairs if p in metrics[s])
    head = sample.get("headline", "precision@10")
    rule = ("share at least one condition" if sample.get("relevance") == "overlap"
            else "have the same primary condition")
    rows = []
    for p in pairs:
        row = [p, next((metrics[s][p]["cross_modal"]["n_queries"] for s in stages if p in metrics[s]), "")]
        for s in stages:
            c = _get(metrics[s], p, "cross_modal")
            row.append(pct(c.get(head), c.get("ci95")) if c else DASH)
        row.append(pct(next((_get(metrics[s], p, "cross_modal", "chance") for s in stages
                             if p in metrics[s]), None)))
        rows.append(row)
    out = ["## 4. Cross-modal retrieval between linked test patients",
           f"Queries of one modality ranked against the other modality's items of the linked "
           f"test patients. Class-level {head}: a retrieved item is relevant when the two "
           f"patients {rule}. Cells: % [bootstrap 95% CI]; chance = expected precision of a "
           f"random ranking.",
           table(["query→gallery", "queries"] + [f"{s} {head}" for s in stages] + ["chance"], rows)]
    ks = sorted(int(k.split("@")[1]) for k in sample if k.startswith("patient_R@"))
    rows = [[p] + [" / ".join(pct(_get(metrics[s], p, "cross_modal", f"patient_R@{k}")) for k in ks)
                   for s in stages]
            + [" / ".join(pct(_get(metrics[stages[0]], p, "cross_modal", f"patient_chance_R@{k}"))
                          for k in ks)]
            for p in pairs]
    out += [f"**Same-patient retrieval** (MIMIC-PAIR style): Recall@{'/'.join(map(str, ks))}, the "
            f"relevant item is the query patient's own item of the other modality.",
            table(["query→gallery"] + stages + ["chance"], rows)]
    rows = []
    for p in pairs:
        row = [p]
        for s in stages:
            z = _get(metrics[s], p, "cross_modal_zeroshot")
            row.append(pct(z["accuracy"], z.get("ci95")) if z else DASH)
        row.append(pct(next((_get(metrics[s], p, "cross_modal_zeroshot", "chance") for s in stages
                             if _get(metrics[s], p, "cross_modal_zeroshot")), None)))
        rows.append(row)
    out += ["**Cross-modality zero-shot** (MEDBind): each query is assigned the primary "
            "condition whose prototype (mean embedding of the other modality's items of that "
            "condition, the query patient's own items left out) is most similar. Accuracy % "
            "[95% CI].",
            table(["query→support"] + stages + ["chance"], rows)]
    if "cross_modal" in report.get("plots", {}):
        out.append(f"![cross-modal precision above chance]({report['plots']['cross_modal']})")
    return out


def _openi(report: dict) -> list[str]:
    encoders: dict[str, dict] = {}
    for name, ref in report.get("reference", {}).items():
        if _get(ref, "cxr", "openi_text"):
            encoders[f"{name} (initialisation)"] = ref["cxr"]["openi_text"]
    for s, by_mod in report["metrics"].items():
        if _get(by_mod, "cxr", "openi_text"):
            encoders[s] = by_mod["cxr"]["openi_text"]
    if not encoders:
        return []
    names = sorted({k[4:-1] for e in encoders.values() for k in e if k.startswith("auc[")})
    n = next(iter(encoders.values())).get("n_reports")
    rows = [[enc] + [pct(e.get(f"auc[{f}]")) for f in names]
            + [pct(e.get("mean_auc"), e.get("ci95")), pct(e.get("top1_hit"))]
            for enc, e in encoders.items()]
    return ["## 5. Clinical language: OpenI chest X-ray reports (real text)",
            f"{n} real reports (Indiana University / OpenI, not simulated). Each report's text "
            "is compared with the CXR label prompts in the text encoder's space; AUC per "
            "finding against the report's MeSH headings; top-1 = share of reports with a "
            "mapped finding whose best-ranked label is one of them. Binding should keep the "
            "student near its initialisation.",
            table(["text encoder"] + [f"AUC {f}" for f in names] + ["mean AUC", "top-1"], rows)]


def _figures(report: dict) -> list[str]:
    plots = report.get("plots", {})
    sim = " (simulated data)" if report.get("simulated") else ""
    out = []
    tsne = [k for k in plots if k.startswith("tsne_")]
    if tsne:
        out.append(f"## 6. Embedding maps{sim}")
        out.append("t-SNE of the linked test set (items of patients with several modalities), "
                   "coloured by modality (left) and by the patient's primary condition (right), "
                   "as MEDBind Fig. 2. A bound space mixes modalities and groups conditions.")
        out += [f"![{k}]({plots[k]})" for k in tsne]
        for stage, earlier in report.get("tsne_same_as", {}).items():
            out.append(f"Stage '{stage}' embeds every item exactly as stage '{earlier}' "
                       f"(distillation trains the text side only), so its map is the one above.")
    conf = [k for k in plots if k.startswith("confusion_")]
    if conf:
        out.append(f"## 7. Zero-shot confusion matrices{sim}")
        out += [f"![{k}]({plots[k]})" for k in conf]
    return out


def _fmt_ms(cell: dict) -> str:
    if not cell or not cell.get("n"):
        return DASH
    return f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def render_comparison(comparison: dict) -> str:
    """The options-comparison section (``train.compare``): per comparison, each metric's
    mean ± std over seeds for the reference and the option, and the paired difference."""
    seeds = comparison.get("seeds", [])
    lines = [f"## Options against the plain run (simulated; mean ± sample std over {len(seeds)} "
             f"seeds {seeds})", ""]
    for c in comparison.get("comparisons", []):
        ref, opt = c["reference"], c["option"]
        rows = [[r["metric"], _fmt_ms(r.get(ref)), _fmt_ms(r.get(opt)), _fmt_ms(r.get("delta")),
                 f"{r['delta']['wins']}/{r['delta']['n']}" if r.get("delta", {}).get("n") else DASH]
                for r in c["rows"]]
        lines += [f"### {c['title']}", "",
                  table(["metric", ref, opt, f"{opt} − {ref}", "seeds where higher"], rows), ""]
    return "\n".join(lines) + "\n"


def render_markdown(report: dict) -> str:
    """The whole ``report.md`` for a report dict (as ``train.stages.evaluate`` builds it)."""
    sim = report.get("simulated")
    lines = ["# m3bind evaluation report", ""]
    if sim:
        lines += ["> **Simulated data.** Every number and figure in sections 1–4 and 6–7 is "
                  "computed on the simulated cohort of `data_registry.synthetic`; it shows that "
                  "the pipeline works, not how a model performs on patients. Section 5 uses "
                  "real report text.", ""]
    data = report.get("data", {})
    lines += [f"Created {report.get('created', '')}; cohort `{data.get('root', '')}` "
              f"(split `{data.get('test_split', 'test')}`).", ""]
    lines.append(table(["stage", "model id", "modalities", "dim"],
                       [[s, f"`{m.get('model_id')}`", ", ".join(m.get("modalities", [])), m.get("dim")]
                        for s, m in report.get("models", {}).items()]))
    n_test, n_sup = data.get("n_test", {}), data.get("n_support", {})
    if n_test:
        lines += ["", table(["", *n_test], [["test items", *n_test.values()],
                                            ["few-shot support pool", *(n_sup.get(m, 0) for m in n_test)]])]
    cfg = report.get("config", {})
    lines += ["", f"Bootstrap: {cfg.get('bootstrap')} resamples, percentile "
              f"{int(100 * cfg.get('ci_level', 0.95))}% intervals over test items (queries)."]
    if report.get("timing_seconds"):
        lines.append("Evaluation time: " + ", ".join(
            f"{k} {v:.0f} s" for k, v in report["timing_seconds"].items()) + ".")
    lines.append("")
    for section in (_zeroshot, _fewshot, _retrieval, _cross_modal, _openi, _figures):
        part = section(report)
        if part:
            lines += ["\n\n".join(part), ""]
    if report.get("options_comparison"):
        lines += [render_comparison(report["options_comparison"]), ""]
    notes = report.get("notes") or []
    failed = data.get("failed_items") or {}
    if notes or failed:
        lines.append("## Notes")
        lines += [f"- {n}" for n in notes]
        if failed:
            lines.append(f"- {len(failed)} items could not be read and were left out: "
                         + "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:10]))
    return "\n".join(lines) + "\n"
