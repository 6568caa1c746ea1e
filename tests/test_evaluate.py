"""The evaluation harness end to end: report schema, caching, subsets, config, CLI helpers.

Most tests use hand-built fake models (bag-of-words text encoder; items embedded near their
label and condition words) and a hand-written manifest, so that the expected outcome is known:
a model whose items carry their label must beat chance, a model with no signal must not.
"""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from m3bind.errors import ConfigError, CorruptFile
from m3bind.io.sample import Sample
from m3bind.modalities import SPECS
from train import clinical_text as ct
from train import metrics as M
from train.stages import evaluate as ev

FAST = dict(bootstrap=50, fewshot_sets=3, openi_reports=0, tsne_max_points=200)


def _word_vec(word: str, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, zlib.crc32(word.encode())]).normal(size=dim)


class FakeModel:
    """The BoundModel contract with a bag-of-words text space.

    An item embeds as ``signal * (label words + condition words) + noise``; ``signal=0`` gives
    a model that knows nothing. ``shared=False`` mimics the zoo (one text encoder per modality).
    """

    def __init__(self, modalities, dim=48, signal=1.0, seed=0, shared=True, name="fake"):
        self.modalities, self.dim, self.signal, self.seed = list(modalities), dim, signal, seed
        self.shared, self.model_id, self.logit_scale = shared, f"{name}-{seed}", 20.0
        self.preprocess_params = {m: {} for m in self.modalities}
        self.embedded: list[str] = []

    def _text(self, text: str) -> np.ndarray:
        words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
        v = sum((_word_vec(w, self.dim, self.seed) for w in words), np.zeros(self.dim))
        return v / max(np.linalg.norm(v), 1e-9)

    def embed_text(self, texts, modality=None):
        if not self.shared and modality not in self.modalities:
            raise ValueError("per-modality text encoders need a modality")
        return np.stack([self._text(t) for t in texts]).astype(np.float32)

    def embed(self, samples, batch_size=32):
        out = []
        for s in samples:
            assert s.modality in self.modalities
            self.embedded.append(s.path)
            rng = np.random.default_rng([self.seed, zlib.crc32(s.path.encode())])
            v = self.signal * (self._text(s.meta["label"]) + 0.7 * self._text(
                s.meta["condition"].replace(";", " "))) + 0.6 * rng.normal(size=self.dim) / np.sqrt(self.dim)
            out.append(v / np.linalg.norm(v))
        return np.stack(out).astype(np.float32)


def fake_label_embeddings(model, modality, labels, mode):
    spec = SPECS[modality]
    if mode == "naive":
        return model.embed_text(list(labels), modality=modality)
    if mode == "expert":
        texts = [[d for d in spec.descriptions.get(lab, (lab,))] for lab in labels]
    else:
        texts = [[t.format(lab) for t in spec.templates] for lab in labels]
    return np.stack([model.embed_text(t, modality=modality).mean(0) for t in texts])


CONDITIONS = ["healthy", "heart_failure", "pneumonia", "diabetes;hypertension", "stroke"]
MODS = ("cxr", "ecg", "retina")


def write_cohort(root: Path, n_train=150, n_test=24, seed=0, bad_item=True) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_train + n_test):
        split = "test" if p >= n_train else "train"
        mods = MODS if split == "test" else (MODS[p % len(MODS)],)
        cond = CONDITIONS[int(rng.integers(len(CONDITIONS)))]
        for m in mods:
            labels = SPECS[m].labels
            label = labels[int(rng.integers(len(labels)))]
            findings = {"finding a": int(label == labels[1]), "finding b": int(rng.random() < 0.4)}
            rows.append(dict(item_id=f"{m}-{p}", patient=f"SIM{p:05d}", modality=m,
                             path=f"{m}/{p}.png", label=label, findings=json.dumps(findings),
                             condition=cond, report=f"{label}." if rng.random() < 0.5 else
                             f"{label}, patient {p}.", split=split, pair_id="",
                             study_date="2020-01-01"))
    if bad_item:
        rows.append(dict(rows[-1], item_id="broken", path="cxr/broken.png", modality="cxr",
                         label=SPECS["cxr"].labels[0]))
    root.mkdir(parents=True, exist_ok=True)
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


class Loader:
    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, root, item):
        self.calls.append(item.item_id)
        if item.item_id == "broken":
            raise CorruptFile("truncated PNG", str(root / item.path))
        return Sample(array=np.zeros((2, 2), np.float32), modality=item.modality, format="png",
                      path=str(root / item.path), meta={"label": item.label, "condition": item.condition})


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setattr(ev, "label_embeddings", lambda *a: ev._normalise(fake_label_embeddings(*a)))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"))


def test_report_schema_and_signal(tmp_path, cohort, patched):
    models = {"zoo": FakeModel(MODS, signal=0.0, shared=False, name="zoo"),
              "distilled": FakeModel(MODS, signal=1.0, name="student")}
    loader = Loader()
    cfg = ev.EvalConfig(fewshot_shots={"cxr": [1, 2], "ecg": [1, 2], "retina": [1, 50]}, **FAST)
    report = ev.evaluate(models, cohort, tmp_path / "out", cfg, loader=loader)
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["metrics"].keys() == {"zoo", "distilled"}
    assert on_disk == json.loads(json.dumps(report))
    for stage in ("zoo", "distilled"):
        for m in MODS:
            task = on_disk["metrics"][stage][m]
            assert {"accuracy", "macro_f1", "auc", "chance", "precision",
                    "balanced_accuracy"} <= task["zeroshot"].keys()
            assert {"R@1", "R@5", "R@10", "t2i_R@1", "rsum"} <= task["retrieval"].keys()
            assert {"zeroshot_naive", "zeroshot_expert", "multilabel", "fewshot"} <= task.keys()
            # retina's 50-shot cannot be drawn from this pool
            assert set(task["fewshot"]) == ({"1-shot"} if m == "retina" else {"1-shot", "2-shot"})
            lo, hi = task["zeroshot"]["ci95"]
            assert lo <= task["zeroshot"]["accuracy"] <= hi
        for a in MODS:
            for b in MODS:
                if a != b:
                    cm = on_disk["metrics"][stage][f"{a}->{b}"]["cross_modal"]
                    assert {"precision@10", "chance", "ci95", "patient_R@1"} <= cm.keys()
                    assert cm["ci95"][0] <= cm["precision@10"] <= cm["ci95"][1]
                    assert 0 < cm["chance"] < 1
    good, null = on_disk["metrics"]["distilled"], on_disk["metrics"]["zoo"]
    for m in MODS:
        assert good[m]["zeroshot"]["accuracy"] > good[m]["zeroshot"]["chance"] + 0.2
        assert null[m]["zeroshot"]["accuracy"] < good[m]["zeroshot"]["accuracy"]
        assert good[m]["fewshot"]["1-shot"]["accuracy_mean"] > 0.5
    assert good["cxr->ecg"]["cross_modal"]["precision@10"] > good["cxr->ecg"]["cross_modal"]["chance"] + 0.2
    assert good["cxr->ecg"]["cross_modal_zeroshot"]["accuracy"] > 0.5
    assert any("retina 50-shot" in n for n in on_disk["notes"])
    assert on_disk["data"]["failed_items"] == {"broken": "truncated PNG (%s)" % (cohort / "cxr/broken.png")}
    assert on_disk["simulated"] is True
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Simulated data" in md and "cxr->ecg" in md and "Few-shot" in md
    for rel in on_disk["plots"].values():
        assert (tmp_path / "out" / rel).read_bytes()[:4] == b"\x89PNG"
        assert f"({rel})" in md
    assert {"fewshot", "cross_modal", "tsne_distilled", "confusion_zoo"} <= on_disk["plots"].keys()


def test_every_item_read_once_and_embedded_once_per_model(tmp_path, cohort, patched):
    models = {"bound": FakeModel(MODS, shared=False), "distilled": FakeModel(("cxr", "ecg"))}
    loader = Loader()
    cfg = ev.EvalConfig(plots=False, **FAST)
    report = ev.evaluate(models, cohort, tmp_path, cfg, loader=loader)
    assert len(loader.calls) == len(set(loader.calls))
    for model in models.values():
        assert len(model.embedded) == len(set(model.embedded)) > 0
    assert not any(p.startswith(str(cohort / "retina")) for p in models["distilled"].embedded)
    assert "retina" not in report["metrics"]["distilled"]
    assert "retina->cxr" in report["metrics"]["bound"] and "retina->cxr" not in report["metrics"]["distilled"]


def test_zeroshot_numbers_match_direct_computation(tmp_path, cohort, patched):
    model = FakeModel(("ecg",), signal=0.5)
    cfg = ev.EvalConfig(modalities=["ecg"], plots=False, zeroshot_modes=["ensemble"], **FAST)
    report = ev.evaluate({"distilled": model}, cohort, tmp_path, cfg, loader=Loader())
    assert list(report["metrics"]["distilled"]) == ["ecg"]
    items = [it for it in ev.read_items(cohort) if it.modality == "ecg" and it.split == "test"]
    labels = list(SPECS["ecg"].labels)
    emb = model.embed([Loader()(cohort, it) for it in items])
    lab = ev._normalise(fake_label_embeddings(model, "ecg", labels, "ensemble"))
    y = np.array([labels.index(it.label) for it in items])
    from sklearn.metrics import accuracy_score, f1_score

    pred = (emb @ lab.T).argmax(1)
    zs = report["metrics"]["distilled"]["ecg"]["zeroshot"]
    assert zs["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert zs["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert zs["chance"] == pytest.approx(np.bincount(y).max() / len(y))
    uniq, inv = M.dedupe_texts([it.report for it in items])
    ranks = M.first_relevant_rank(emb @ model.embed_text(uniq).T, inv[:, None] == np.arange(len(uniq)))
    assert report["metrics"]["distilled"]["ecg"]["retrieval"]["R@5"] == pytest.approx(np.mean(ranks < 5))


def test_test_patient_cap_keeps_patients_linked(tmp_path, cohort, patched):
    cfg = ev.EvalConfig(**{**FAST, "plots": False, "max_test_items": 10, "zeroshot_modes": ["naive"]})
    report = ev.evaluate({"distilled": FakeModel(MODS)}, cohort, tmp_path, cfg, loader=Loader())
    n = report["data"]["n_test"]
    assert 8 <= n["cxr"] <= 10 and n["cxr"] == n["retina"] == n["ecg"]  # the same patients
    assert report["metrics"]["distilled"]["cxr->retina"]["cross_modal"]["n_queries"] == n["cxr"]
    assert report["metrics"]["distilled"]["cxr"]["zeroshot"]["prompts"] == "naive"


@pytest.mark.slow
def test_minilm_initialisation_reads_clinical_text():
    encode = ct.minilm_encoder()
    e = encode(["the heart is enlarged", "cardiomegaly", "fracture of the left clavicle"])
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert e.shape == (3, 384)
    assert e[0] @ e[1] > e[0] @ e[2]


def test_relevance_rule_is_condition_overlap():
    rel = ev.relevance_matrix(["healthy", "diabetes;hypertension", "stroke"],
                              ["healthy", "hypertension", "stroke;diabetes"], "overlap")
    np.testing.assert_array_equal(rel, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    prim = ev.relevance_matrix(["stroke;diabetes"], ["stroke", "diabetes"], "primary")
    np.testing.assert_array_equal(prim, [[1, 0]])


def test_openi_text_task_hand_case():
    # A 2-d "text space": the x axis means cardiomegaly, y means everything else.
    def encode(texts):
        return np.array([[1.0, 0.1] if "cardiomegaly" in t or "heart" in t else [0.1, 1.0]
                         for t in texts])

    reports = [("the heart is enlarged", ["Cardiomegaly/mild"]), ("clear lungs", ["normal"]),
               ("big heart", ["Cardiomegaly", "Pleural Effusion/left"]), ("ok", ["normal"])]
    out = ct.openi_text_task(encode, reports, n_boot=0)
    assert out["auc[cardiomegaly]"] == pytest.approx(1.0)
    assert out["positives"]["cardiomegaly"] == 2 and out["positives"]["pleural effusion"] == 1
    assert out["n_reports"] == 4
    assert "auc[lung mass]" not in out  # no positives: undefined, left out


def test_openi_section_with_reference_encoder(tmp_path, cohort, patched, monkeypatch):
    reports = [(f"{w} seen", [mesh]) for w, mesh in
               [("cardiomegaly", "Cardiomegaly"), ("effusion", "Pleural Effusion"), ("normal", "normal")] * 4]
    monkeypatch.setattr(ct, "openi_reports", lambda n, seed: reports)
    monkeypatch.setattr(ct, "minilm_encoder", lambda: FakeModel(MODS, seed=5).embed_text)
    cfg = ev.EvalConfig(**{**FAST, "openi_reports": 12, "plots": False, "modalities": ["cxr"]})
    report = ev.evaluate({"distilled": FakeModel(MODS)}, cohort, tmp_path, cfg, loader=Loader())
    assert report["reference"]["minilm_init"]["cxr"]["openi_text"]["n_reports"] == 12
    assert report["metrics"]["distilled"]["cxr"]["openi_text"]["auc[cardiomegaly]"] == pytest.approx(1.0)
    assert "OpenI" in (tmp_path / "report.md").read_text()


def test_eval_config_validation_and_yaml_mapping():
    from m3bind.config import from_dict

    cfg = from_dict(ev.EvalConfig, {"fewshot_shots": {"ecg": [2, 1]}, "bootstrap": 10})
    assert cfg.shots("ecg") == [1, 2] and cfg.shots("cxr") == [1, 10, 100]
    assert cfg.shots("ct") == [1, 5, 10] and cfg.shots("retina") == [1, 5, 10]
    for bad in ({"modalities": ["xray"]}, {"zeroshot_modes": ["fancy"]}, {"chance": "x"},
                {"fewshot_sets": 0}, {"bootstrap": -1}, {"relevance": "any"},
                {"fewshot_shots": {"ecg": [0]}}, {"ci_level": 1.5}, {"nope": 1}):
        with pytest.raises(ConfigError):
            from_dict(ev.EvalConfig, bad)


def test_stage_name_from_provenance(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"provenance": {"stage": "bound"}}))
    assert ev.stage_name(tmp_path) == "bound"
    (tmp_path / "config.json").write_text(json.dumps({"provenance": {"stage": "distill"}}))
    assert ev.stage_name(tmp_path) == "distilled"  # train/run_all's stage names map to the report's
    assert ev.stage_name(tmp_path / "missing") is None


def test_missing_manifest_is_a_user_error(tmp_path):
    from m3bind.errors import M3BindError

    with pytest.raises(M3BindError, match="manifest"):
        ev.read_items(tmp_path)
    assert ev.main(["--model", str(tmp_path), "--data", str(tmp_path), "--out",
                    str(tmp_path / "o"), "--stage-names", "a,b"]) == 2


@pytest.mark.slow
def test_cli_on_tiny_models_and_generated_cohort(tmp_path):
    """The real pieces: a generated cohort, tiny model directories, m3bind.io and m3bind.zeroshot."""
    from data_registry.synthetic import generate
    from m3bind.testing import build_tiny_bound_model

    mods = ("cxr", "ecg")
    cohort = tmp_path / "cohort"
    generate(cohort, patients=24, seed=3, progress=False, modalities=mods, test_fraction=0.4)
    build_tiny_bound_model(mods, seed=1, shared_text=False, name="zoo").save(
        tmp_path / "zoo", provenance={"stage": "zoo"})
    build_tiny_bound_model(mods, seed=2).save(tmp_path / "student", provenance={"stage": "distilled"})
    out = tmp_path / "out"
    rc = ev.main(["--model", str(tmp_path / "zoo"), "--model", str(tmp_path / "student"),
                  "--data", str(cohort), "--out", str(out), "--set", "bootstrap=20",
                  "--set", "fewshot_sets=2", "--set", "openi_reports=0", "--set", "plots=false"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["metrics"]) == ["zoo", "distilled"] and report["simulated"] is True
    for stage in ("zoo", "distilled"):
        for m in mods:
            zs = report["metrics"][stage][m]["zeroshot"]
            assert 0 <= zs["accuracy"] <= 1 and zs["chance"] > 0 and len(zs["ci95"]) == 2
            assert {"R@1", "R@5", "R@10"} <= report["metrics"][stage][m]["retrieval"].keys()
        cm = report["metrics"][stage]["cxr->ecg"]["cross_modal"]
        assert {"precision@10", "chance", "ci95"} <= cm.keys()
    assert report["data"]["failed_items"] == {}
    assert "Simulated data" in (out / "report.md").read_text()


def test_public_dataset_adapter_items(tmp_path, patched):
    """A data-set adapter's records go through the same harness (labels -> findings)."""
    from data_registry.datasets.base import DATASETS, MedicalDataset, Record

    nan = float("nan")

    class FakeCXRSet(MedicalDataset):
        name = "fake-cxr-for-eval-tests"
        modality = "cxr"
        labels = ("cardiomegaly", "pleural effusion", "edema")

        def _scan(self):
            rng = np.random.default_rng(0)
            for i in range(40):
                pos = int(rng.integers(3))
                vec = np.zeros(3, np.float32)
                vec[pos] = 1
                if i % 5 == 0:
                    vec[2] = nan  # unknown: never scored
                yield Record(self.root / f"{i}.png", f"P{i}", vec,
                             report=f"{self.labels[pos]} noted.", split="test" if i < 30 else "train")

    if FakeCXRSet.name not in DATASETS:
        DATASETS.register(FakeCXRSet.name)(FakeCXRSet)
    items = ev.items_from_dataset(FakeCXRSet.name, tmp_path)
    assert len(items) == 40 and items[0].modality == "cxr"
    assert "edema" not in items[0].findings and items[1].findings  # NaN left out
    assert {it.label for it in items} <= {"cardiomegaly", "pleural effusion", ""}

    class DatasetLoader(Loader):
        def __call__(self, root, item):
            s = super().__call__(root, item)
            s.meta["label"] = item.report  # the fake model embeds the named finding
            return s

    cfg = ev.EvalConfig(**{**FAST, "plots": False, "fewshot_shots": {"cxr": [1]}})
    report = ev.evaluate({"distilled": FakeModel(("cxr",))}, tmp_path, tmp_path / "out", cfg,
                         loader=DatasetLoader(), items=items)
    cxr = report["metrics"]["distilled"]["cxr"]
    assert report["simulated"] is False
    assert cxr["zeroshot"]["n"] == sum(it.label != "" and it.split == "test" for it in items)
    assert cxr["multilabel"]["auc[cardiomegaly]"] > 0.9 and "auc[edema]" in cxr["multilabel"]
    assert cxr["retrieval"]["n_items"] == 30
    assert not any("->" in k for k in report["metrics"]["distilled"])
    assert "Simulated data" not in (tmp_path / "out" / "report.md").read_text()
