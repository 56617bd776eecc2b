"""The training configuration every method shares; field names follow diffusers' and kohya's training flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from studio.adapters.library import library_dir
from studio.errors import ConfigError


def parse_resolution(text: str) -> int | tuple[int, int]:
    """``--resolution``: "512" (a square) or "W,H" (kohya's form), e.g. "1024,768"."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--resolution must be a number or W,H, not {text!r}") from None
    if len(numbers) == 1:
        return numbers[0]
    if len(numbers) == 2:
        return (numbers[0], numbers[1])
    raise ConfigError(f"--resolution must be a number or W,H, not {text!r}")


@dataclass
class TrainConfig:
    """Options of the shared training loop (methods add their own dataclasses on top)."""

    images: Path | None = None  # folder of training images (+ optional .txt captions, N_name repeat folders)
    instance_prompt: str | None = None  # caption for images without a .txt sidecar, e.g. "a sks shape"
    trigger_words: list[str] = field(default_factory=list)  # stored in metadata; default: words of instance_prompt
    kind: str = "content"  # content | style: what the adapter is meant to carry
    output: str = "adapter"  # adapter name: <output_dir>/<output>.safetensors
    output_dir: Path | None = None  # default: the adapter library
    model: str | None = None  # base model spec (default: the embedded model)
    seed: int = 0
    resolution: int | tuple[int, int] | None = field(default=None, metadata={
        "help": "training size: one number (square) or W,H; default: the base model's native size",
        "type": parse_resolution})
    center_crop: bool = True
    random_flip: bool = False
    enable_bucket: bool = field(default=False, metadata={
        "help": "aspect-ratio buckets (kohya): each image trains at the bucket of nearest aspect ratio, about "
                "resolution² in area"})
    min_bucket_reso: int | None = field(default=None, metadata={
        "help": "smallest bucket side in pixels (default: half the resolution)"})
    max_bucket_reso: int | None = field(default=None, metadata={
        "help": "largest bucket side in pixels (default: twice the resolution)"})
    bucket_reso_steps: int | None = field(default=None, metadata={
        "help": "bucket sides are multiples of this (default: 64 at 1024 px, the base's multiple at least)"})
    caption_extension: str = field(default=".txt", metadata={"help": "caption sidecar extension, e.g. .caption"})
    shuffle_caption: bool = field(default=False, metadata={
        "help": "shuffle the comma-separated tags of each caption at every step"})
    keep_tokens: int = field(default=0, metadata={
        "help": "with --shuffle_caption, keep the first N tags in place (the trigger)", "min": 0})
    caption_dropout_rate: float = field(default=0.0, metadata={
        "help": "train on the empty caption at this rate (0 to 1)"})
    repeats: int = 1
    rank: int = 4
    network_alpha: float | None = None  # default: alpha = rank (scale 1)
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    train_text_encoder: bool = False
    learning_rate: float = 1e-3
    text_encoder_lr: float | None = None
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    max_train_steps: int = 300
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    adam_weight_decay: float = 1e-2
    use_8bit_adam: bool = False  # diffusers' flag: --optimizer adamw8bit
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw | adamw8bit | prodigy | adafactor | lion (all but adamw and adafactor need the train extra)",
        "aliases": ("--optimizer_type",)})
    vae: str | None = field(default=None, metadata={
        "help": "encode the training images with this VAE (a diffusers folder or .safetensors file), e.g. an "
                "fp16-fix VAE; otherwise the base's VAE encodes in float32"})
    noise_offset: float = field(default=0.0, metadata={
        "help": "add this much per-channel offset noise (0.05-0.1 helps very dark or bright images)"})
    snr_gamma: float | None = None  # min-SNR weighting (Hang et al. 2023); 5.0 is the usual value
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    class_prompt: str | None = None  # default on the embedded model: ordinary domain prompts
    num_class_images: int = 50
    mixed_precision: str = field(default="no", metadata={
        "help": "autocast and the frozen base's dtype (fp16 only on CUDA)", "choices": ("no", "fp16", "bf16")})
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 0  # 0: no intermediate checkpoints
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    report_to: str = field(default="none", metadata={
        "help": "log loss, learning rate and validation images", "choices": ("none", "tensorboard", "wandb")})
    logging_dir: Path | None = field(default=None, metadata={
        "help": "where the tracker writes (default: logs/ in the run's work folder)"})
    validation_prompt: str | None = None
    validation_steps: int = 0
    num_validation_images: int = 2
    validation_weights: tuple[float, ...] = (1.0,)  # adapter weights the preview is drawn at
    decor_remove: list[str] = field(default_factory=list)  # DECOR: words projected out of caption embeddings
    decor_alpha: float = 1.0
    export_layout: str = "diffusers"  # diffusers | kohya
    save_precision: str | None = None  # fp16 | bf16 | fp32; default fp16 for kohya (as sd-scripts), fp32 otherwise
    device: str | None = None

    def output_folder(self) -> Path:
        """Where the adapter goes: ``output_dir``, else the adapter library."""
        return Path(self.output_dir) if self.output_dir else library_dir()

    def work_folder(self) -> Path:
        """The run's checkpoints, previews and class images: ``<output>-work`` beside the adapter."""
        return self.output_folder() / f"{self.output}-work"

    def __post_init__(self) -> None:
        low = {"rank": 1, "train_batch_size": 1, "gradient_accumulation_steps": 1, "repeats": 1,
               "max_train_steps": 0, "checkpointing_steps": 0, "validation_steps": 0, "lr_warmup_steps": 0}
        wrong = [f"{name} must be at least {least}, not {getattr(self, name)!r}" for name, least in low.items()
                 if getattr(self, name) < least]
        if isinstance(self.resolution, str):
            self.resolution = parse_resolution(self.resolution)
        if isinstance(self.resolution, (tuple, list)):
            self.resolution = (int(self.resolution[0]), int(self.resolution[1]))
        sides = (self.resolution,) if isinstance(self.resolution, int) else self.resolution or ()
        if any(side < 1 for side in sides):
            wrong.append(f"resolution must be positive, not {self.resolution!r}")
        if self.keep_tokens < 0:
            wrong.append(f"keep_tokens must be at least 0, not {self.keep_tokens}")
        if not 0.0 <= self.caption_dropout_rate < 1.0:
            wrong.append(f"caption_dropout_rate must be in [0, 1), not {self.caption_dropout_rate}")
        self.optimizer = self.optimizer.lower()  # kohya's --optimizer_type AdamW8bit
        if not self.caption_extension.startswith("."):
            self.caption_extension = f".{self.caption_extension}"
        if wrong:
            raise ConfigError("; ".join(wrong))
