"""The training configuration every method shares; field names follow diffusers' and kohya's training flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
    resolution: int | None = None  # default: the base model's native size
    center_crop: bool = True
    random_flip: bool = False
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
    use_8bit_adam: bool = False  # used when bitsandbytes is importable on CUDA
    snr_gamma: float | None = None  # min-SNR weighting (Hang et al. 2023); 5.0 is the usual value
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    class_prompt: str | None = None  # default on the embedded model: ordinary domain prompts
    num_class_images: int = 50
    mixed_precision: str = "no"  # no | fp16 | bf16 (CUDA)
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 0  # 0: no intermediate checkpoints
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
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
        from studio.adapters.library import library_dir

        return Path(self.output_dir) if self.output_dir else library_dir()

    def work_folder(self) -> Path:
        """The run's checkpoints, previews and class images: ``<output>-work`` beside the adapter."""
        return self.output_folder() / f"{self.output}-work"

    def __post_init__(self) -> None:
        from studio.errors import ConfigError

        low = {"rank": 1, "train_batch_size": 1, "gradient_accumulation_steps": 1, "repeats": 1,
               "max_train_steps": 0, "checkpointing_steps": 0, "validation_steps": 0, "lr_warmup_steps": 0}
        wrong = [f"{name} must be at least {least}, not {getattr(self, name)!r}" for name, least in low.items()
                 if getattr(self, name) < least]
        if wrong:
            raise ConfigError("; ".join(wrong))
