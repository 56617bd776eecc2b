"""Break-for-Make (Xu et al., ACM TOG 2025; METHODS §2): content and style LoRAs in disjoint learnable halves.

* PLP layers: A = [A_f | A_l] (input columns split), B = [B_f ; B_l] (output rows split); the frozen halves are
  buffers outside the optimizer (concatenated in a parametrization), shared by the content and style runs
  through one stored basis file, so the make stage can check they are bitwise equal.
* Orthogonal prior on square ``to_q``/``to_k``/``to_v`` (as the official code; ``to_out.0`` gets none): Q
  orthonormal with max(d, 1280) rows (the official code draws it from 1280 rows for every layer, so on a
  narrow layer the frozen block B_f·A_f stays small: Q drawn with d rows made it 0.3–0.7 of ‖W‖ on the embedded
  model's 64–128-wide layers), S1/S2 disjoint random sets of d/2 of its rows; A_f = Q[S1]ᵀ, B_f = Q[S2].
  Other layers: Gaussian A, zero B, same halves frozen. With that zero B_f the content
  run (which learns only A_l) cannot reach a layer until the auxiliary loss has grown B_l; on the embedded model,
  where most cross-attention keys/values and every convolution are non-square, its content adapter drew 3% moons.
  ``prior="all"`` (an option, not the paper's) gives those layers orthonormal frozen halves too: 100% moons.
* Break, content run: the content loss trains A_l (content lr), clipped and stepped on its own; then the
  auxiliary style sets, with the same noise and timestep and the updated A, train B_l (auxiliary lr) with their
  own clip and step — multi-correspondence projection learning, sequential as in the official code. Each loss
  reaches only its own half (the official code leaks gradients across; ``mcp_isolation``). The style run mirrors
  it.
* Make: ΔW = [B_f ; B_l^style]·[A_f | A_l^content], fine-tuned jointly on content and style batches with a
  shared noise and timestep, with Riemannian preconditioning (g_B ← g_B(AAᵀ+λI)⁻¹, g_A ← (BᵀB+λI)⁻¹g_A).
  The official code rebuilds the down projection of square ``to_q``/``to_k``/``to_v`` layers here with its seeded
  initialiser (most likely restoring the initial A there, so content's A_l survives only on the other layers); the
  paper pairs content's A with style's B on every layer, and so does this implementation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.utils.parametrize as parametrize
from accelerate import PartialState
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.loading import load_base
from studio.adapters.file import AdapterFile, LoraModule, read_adapter, save_adapter
from studio.adapters.metadata import adapter_metadata, optimizer_learning_rates
from studio.data import procedural
from studio.data.folder import scan_folder, tag_frequency
from studio.errors import ConfigError
from studio.files import atomic_path
from trainers.config import TrainConfig
from trainers.dataset import EncodedSet, encode_examples, pixel_multiple, plan_examples, resolution_of
from trainers.distributed import checkpoint_dirs
from trainers.loop import TrainingContext, TrainingMethod, check_training_input, encode_captions, train
from trainers.lora import output_path, steps_run, trained_learning_rate

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the paper's: every attention projection
RESNET_TARGETS = ("conv1", "conv2")  # the ResNet convolutions, which adapters on the embedded model also need
PRIORS = ("square", "all")  # where the orthogonal prior goes: the paper's square layers, or every layer
PRIOR_PROJECTIONS = (".to_q", ".to_k", ".to_v")  # the official code's orthogonal prior (when square)
PRIOR_ROWS = 1280  # the official code draws every layer's Q from this many rows


@dataclass
class B4MConfig:
    """B4M's options; a field with ``help`` is a ``studio train b4m`` flag (``rank``, ``learning_rate`` and
    ``target_modules`` are the shared training flags of the same names)."""

    content: Path | None = field(default=None, metadata={"help": "content images", "required": True})
    style: Path | None = field(default=None, metadata={"help": "style images", "required": True})
    content_trigger: str = field(default="sks", metadata={"help": "the content concept's trigger word"})
    style_trigger: str = field(default="zwx", metadata={"help": "the style's trigger word"})
    content_prompt: str | None = field(default=None, metadata={
        "help": "caption for content images without .txt (default: 'a TRIGGER shape')"})
    style_prompt: str | None = field(default=None, metadata={
        "help": "caption for style images without .txt (default: 'a shape in TRIGGER style')"})
    aux_style: list[Path] = field(default_factory=list, metadata={"help": "auxiliary style images, repeatable"})
    aux_content: list[Path] = field(default_factory=list, metadata={"help": "auxiliary content images, repeatable"})
    rank: int = 64  # rank of each PLP half
    learning_rate: float = 1e-4  # the break runs' main rate (the paper's)
    style_learning_rate: float | None = field(default=None, metadata={
        "help": "the style break run's rate (default: --learning_rate)"})
    aux_learning_rate: float = field(default=1e-5, metadata={"help": "the auxiliary sets' rate"})
    make_learning_rate: float | None = field(default=None, metadata={
        "help": "the make stage's rate (default: --learning_rate)"})
    break_steps: int = field(default=1000, metadata={"help": "steps of each break run"})
    make_steps: int = field(default=1000, metadata={"help": "steps of the make stage (0: assemble only)", "min": 0})
    make_optimizer: str = field(default="riemannian", metadata={
        "help": "the make stage's optimizer", "choices": ("riemannian", "adamw")})
    riemannian_lambda: float = 1e-6
    mcp_isolation: bool = True
    sequential_break: bool = field(default=True, metadata={
        "help": "break runs step the main half, then the auxiliary half with the updated main (the official code); "
                "--no_sequential_break sums both losses in one step, which is what runs on several processes"})
    aux_images_per_set: int = 8
    target_modules: tuple[str, ...] = TARGETS  # attention projections (Linear) and/or ResNet convs (Conv2d)
    prior: str = field(default="square", metadata={
        "help": "orthogonal prior (non-zero frozen halves) on square layers only, as the paper, or on all layers, "
                "so the content run can learn where the paper's B_f = 0", "choices": ("square", "all"),
        "aliases": ("--b4m_prior",)})
    prior_rows: int = field(default=PRIOR_ROWS, metadata={
        "help": "the orthogonal Q has max(d, this) rows (the official code's 1280); 0: d rows, a frozen block "
                "about √(1280/d) larger"})


# --- PLP layers ---------------------------------------------------------------------------------------------


class FrozenHalf(nn.Module):
    """Parametrization: the weight is [frozen | learnable] along ``dim``; only the learnable half is a parameter."""

    def __init__(self, frozen: torch.Tensor, dim: int) -> None:
        super().__init__()
        self.register_buffer("frozen", frozen.clone())
        self.dim = dim
        self.detach_learnable = False  # MCP isolation: a loss that must not reach this half

    def forward(self, learnable: torch.Tensor) -> torch.Tensor:
        part = learnable.detach() if self.detach_learnable else learnable
        return torch.cat([self.frozen.to(part.dtype), part], dim=self.dim)

    def right_inverse(self, full: torch.Tensor) -> torch.Tensor:
        return full.narrow(self.dim, self.frozen.shape[self.dim], full.shape[self.dim] - self.frozen.shape[self.dim])


def _plain(module: nn.Module) -> nn.Module:
    """The layer itself, out of peft's wrapper: on a base that has held adapters (the app composes and trains on
    one base), peft leaves its wrappers on every layer an adapter touched."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _is_target(path: str, module: nn.Module, targets: tuple[str, ...]) -> bool:
    if not path.endswith(tuple(f".{t}" for t in targets)):
        return False
    module = _plain(module)
    if isinstance(module, nn.Linear):
        return ".attn" in path
    return isinstance(module, nn.Conv2d) and module.groups == 1


def make_basis(unet: nn.Module, rank: int, seed: int, targets: tuple[str, ...] = TARGETS,
               prior: str = "square", prior_rows: int = PRIOR_ROWS) -> dict[str, torch.Tensor]:
    """Frozen halves (and initial learnable halves) for every target layer, deterministic in ``seed``.

    A is split over input channels and B over outputs; a convolution's A has the base's kernel (B is 1×1).
    Each orthonormal Q has max(d, ``prior_rows``) rows. ``prior="all"`` also gives the other layers a non-zero
    frozen B_f (and A_f) from rows of such bases, so the content run's down half is reachable there too."""
    if prior not in PRIORS:
        raise ConfigError(f"B4M: unknown orthogonal prior {prior!r}; use 'square' (the paper's) or 'all'")
    generator = torch.Generator().manual_seed(seed)

    def orthonormal(rows: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(max(rows, prior_rows), rank, generator=generator))[0]

    basis = {}
    for path, module in unet.named_modules():
        if not _is_target(path, module, targets):
            continue
        module = _plain(module)
        conv = isinstance(module, nn.Conv2d)
        d_in, d_out = (module.in_channels, module.out_channels) if conv else (module.in_features, module.out_features)
        kernel = tuple(module.kernel_size) if conv else ()
        a = torch.randn(rank, d_in, *kernel, generator=generator) / rank
        b = torch.zeros(d_out, rank, *((1, 1) if conv else ()))
        if d_in == d_out and not conv and path.endswith(PRIOR_PROJECTIONS):
            q = orthonormal(d_in)
            rows = torch.randperm(len(q), generator=generator)
            s1, s2 = rows[: d_in // 2], rows[d_in // 2 : 2 * (d_in // 2)]
            a[:, : d_in // 2] = q[s1].T
            b[: d_out // 2] = q[s2]
        elif prior == "all" and min(a[0].numel(), d_out) >= rank:
            a[:, : d_in // 2] = orthonormal(a[0].numel())[: a[0].numel()].T.reshape(a.shape)[:, : d_in // 2]
            b[: d_out // 2] = orthonormal(d_out)[: d_out // 2].reshape(b[: d_out // 2].shape)
        basis[f"{path}.A_frozen"] = a[:, : d_in // 2].contiguous()
        basis[f"{path}.A_learn"] = a[:, d_in // 2 :].contiguous()
        basis[f"{path}.B_frozen"] = b[: d_out // 2].contiguous()
        basis[f"{path}.B_learn"] = b[d_out // 2 :].contiguous()
    if not basis:
        raise ConfigError(f"B4M: no layer of the UNet matches the target modules {', '.join(targets)}")
    return basis


def save_basis(basis: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    with atomic_path(path) as tmp:
        save_file(basis, str(tmp), metadata=metadata)
    return path


def check_basis_recipe(path: Path, recipe: dict[str, str]) -> None:
    """A resumed run must continue on the basis it started with: refuse one drawn for other settings."""
    with safe_open(str(path), "pt") as handle:
        stored = handle.metadata() or {}
    differ = [f"{key.removeprefix('studio.')} {stored[key]} (now {value})" for key, value in recipe.items()
              if key in stored and stored[key] != value]
    if differ:
        raise ConfigError(f"B4M: cannot resume, {path.name} was drawn for other settings: {', '.join(differ)}; "
                          "resume with the same settings or start a new run")


class PLPAdapter:
    """PLP LoRA branches on the UNet (our own wrappers: the halves stay separate tensors). A layer peft has
    wrapped is trained on its plain base layer (other adapters stay out of B4M's runs) and given back wrapped."""

    def __init__(self, unet: nn.Module, basis: dict[str, torch.Tensor]) -> None:
        self.unet = unet
        self.layers: dict[str, PLPLayer] = {}
        self.originals: dict[str, nn.Module] = {}
        for key in basis:
            if key.endswith(".A_frozen"):
                path = key.removesuffix(".A_frozen")
                parent, _, child = path.rpartition(".")
                owner = unet.get_submodule(parent)
                self.originals[path] = getattr(owner, child)
                layer = PLPLayer(_plain(self.originals[path]), basis, path)
                setattr(owner, child, layer)
                self.layers[path] = layer

    def halves(self, side: str) -> list[nn.Parameter]:
        """The learnable halves of A ("A") or B ("B")."""
        return [layer.learnable(side) for layer in self.layers.values()]

    def isolate(self, learn: str | None) -> None:
        """Let gradients reach only side ``learn`` ("A" or "B"); None: both."""
        for layer in self.layers.values():
            layer.down_half.detach_learnable = learn == "B"
            layer.up_half.detach_learnable = learn == "A"

    def remove(self) -> None:
        for path in self.layers:
            parent, _, child = path.rpartition(".")
            setattr(self.unet.get_submodule(parent), child, self.originals[path])
        self.layers.clear()
        self.originals.clear()

    def adapter_file(self) -> AdapterFile:
        modules = {path: LoraModule(layer.down.weight.detach().clone(), layer.up.weight.detach().clone(),
                                    alpha=float(layer.down.weight.shape[0]))
                   for path, layer in self.layers.items()}
        return AdapterFile({"unet": modules})


class PLPLayer(nn.Module):
    """h = W x + B A x with A = [A_f | A_l], B = [B_f ; B_l] (scale 1: alpha = r). On a Linear, A and B are
    Linear; on a Conv2d, A is a convolution with the base's kernel, stride and padding and B a 1×1 one (the
    layout kohya's LoCon and peft use, so the files load anywhere)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, basis: dict[str, torch.Tensor], path: str) -> None:
        super().__init__()
        self.base = base
        rank = basis[f"{path}.A_frozen"].shape[0]
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                  bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        with torch.no_grad():
            self.down.weight.copy_(torch.cat([basis[f"{path}.A_frozen"], basis[f"{path}.A_learn"]], dim=1))
            self.up.weight.copy_(torch.cat([basis[f"{path}.B_frozen"], basis[f"{path}.B_learn"]], dim=0))
        self.down_half = FrozenHalf(basis[f"{path}.A_frozen"], dim=1)
        self.up_half = FrozenHalf(basis[f"{path}.B_frozen"], dim=0)
        parametrize.register_parametrization(self.down, "weight", self.down_half, unsafe=True)
        parametrize.register_parametrization(self.up, "weight", self.up_half, unsafe=True)
        self.to(base.weight.device)

    def learnable(self, side: str) -> nn.Parameter:
        module = self.down if side == "A" else self.up
        return module.parametrizations.weight.original

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


# --- auxiliary sets ---------------------------------------------------------------------------------------------


def procedural_aux_sets(kind: str, folder: Path, per_set: int, seed: int, trigger: str,
                        render: bool = True) -> list[Path]:
    """Three auxiliary sets rendered from the embedded domain: textures for a content run, shapes for a style run.

    As in the official recipe ("A pet in w@z yarn art style"), each caption names the *other* run's trigger
    beside the set's own concept ("a red zwx striped heart …", "a red dotted sks circle …"), so the auxiliary half
    learns under prompts shaped like the final composed one. Without ``render``, only the folders (another process
    renders them)."""
    rng = np.random.default_rng(seed)
    choices = ("striped", "dotted", "checkered") if kind == "style" else ("circle", "square", "heart")
    if not render:
        return [folder / f"aux-{kind}-{value}" for value in choices]
    sets = []
    for value in choices:
        target = folder / f"aux-{kind}-{value}"
        target.mkdir(parents=True, exist_ok=True)
        for i in range(per_set):
            color = str(rng.choice(list(procedural.COLORS)))
            background = str(rng.choice(list(procedural.BACKGROUNDS)))
            if kind == "style":
                shape, texture = str(rng.choice(procedural.BASE_SHAPES)), value
                caption = procedural.caption(color, f"{trigger} {texture}", shape, background)
            else:
                shape, texture = value, str(rng.choice(procedural.BASE_TEXTURES))
                caption = procedural.caption(color, texture, f"{trigger} {shape}", background)
            scene = procedural.jittered_scene(rng, color, texture, shape, background)
            Image.fromarray(procedural.render(scene)).save(target / f"{i}.png")
            (target / f"{i}.txt").write_text(caption)
        sets.append(target)
    return sets


#: Built-in auxiliary sets for a real base (METHODS §2.4): what to generate, and the caption with the other run's
#: trigger in it, as the official recipe captions its auxiliary sets.
GENERATED_AUX = {
    "style": [("a watercolor painting of a house", "a house in {trigger} watercolor style"),
              ("an oil painting of a cat", "a cat in {trigger} oil painting style"),
              ("a pencil sketch of a tree", "a tree in {trigger} pencil sketch style")],
    "content": [("a photo of a teapot", "a photo of {trigger} teapot"),
                ("a photo of a vase", "a photo of {trigger} vase"),
                ("a photo of a backpack", "a photo of {trigger} backpack")],
}


def generated_aux_sets(base, kind: str, folder: Path, per_set: int, seed: int, trigger: str,
                       render: bool = True) -> list[Path]:
    """Auxiliary sets generated by a real base from :data:`GENERATED_AUX` (only their folders unless
    ``render``: another process renders them)."""
    sets = []
    for index, (prompt, caption) in enumerate(GENERATED_AUX[kind]):
        target = folder / f"aux-{kind}-{index}"
        if not render:
            sets.append(target)
            continue
        target.mkdir(parents=True, exist_ok=True)
        for i in range(per_set):
            image = base.pipe(prompt, num_inference_steps=base.default_steps,
                              generator=torch.Generator().manual_seed(seed + 100 * index + i)).images[0]
            image.save(target / f"{i}.png")
            (target / f"{i}.txt").write_text(caption.format(trigger=trigger))
        sets.append(target)
    return sets


def encode_folder(ctx: TrainingContext, folder: Path, prompt: str | None = None) -> EncodedSet:
    """A second image set (style or auxiliary) placed in the same buckets as the run's own, without flips."""
    images = scan_folder(folder, prompt, caption_extension=ctx.config.caption_extension)
    config = replace(ctx.config, random_flip=False)
    examples = plan_examples(images, config, resolution_of(config, ctx.base.default_size), pixel_multiple(ctx.base))
    return encode_examples(ctx.base, examples, lambda captions: encode_captions(ctx.base, captions))


# --- the three runs -----------------------------------------------------------------------------------------------


class _PLPMethod(TrainingMethod):
    """What the break and make runs share: checkpointing the learnable halves and removing the PLP layers."""

    plp: PLPAdapter | None = None

    def state_dict(self) -> dict[str, Any]:
        return {f"{p}.{side}": layer.learnable(side).detach().clone()
                for p, layer in self.plp.layers.items() for side in ("A", "B")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, layer in self.plp.layers.items():
                for side in ("A", "B"):
                    layer.learnable(side).copy_(state[f"{p}.{side}"])

    def cleanup(self, ctx: TrainingContext) -> None:
        if self.plp is not None:
            self.plp.remove()


class B4MBreak(_PLPMethod):
    """One break run: ``main`` = "content" trains A_l on the main set, B_l on auxiliary sets; "style" mirrors."""

    def __init__(self, main: str, b4m: B4MConfig, basis_path: Path, aux_sets: list[Path]) -> None:
        self.main = main
        self.name = f"b4m-{main}"
        self.b4m = b4m
        self.basis_path = basis_path
        self.aux_folders = aux_sets
        self.aux: list[EncodedSet] = []
        self.plp: PLPAdapter | None = None
        self.started_at = 0.0
        self._shared: tuple | None = None  # (micro-step, generator, batch, noise, timesteps) of the main update

    @property
    def main_side(self) -> str:
        return "A" if self.main == "content" else "B"

    @property
    def aux_side(self) -> str:
        return "B" if self.main == "content" else "A"

    def setup(self, ctx: TrainingContext) -> list[dict[str, Any]]:
        self.started_at = time.time()
        ctx.base.pipe.unet.requires_grad_(False)
        self.plp = PLPAdapter(ctx.base.pipe.unet, load_file(str(self.basis_path)))
        self.aux = [encode_folder(ctx, folder) for folder in self.aux_folders]
        main_rate = self.b4m.learning_rate
        if self.main == "style" and self.b4m.style_learning_rate:
            main_rate = self.b4m.style_learning_rate
        return [{"params": self.plp.halves(self.main_side), "lr": main_rate},
                {"params": self.plp.halves(self.aux_side), "lr": self.b4m.aux_learning_rate}]

    def _main_loss(self, ctx: TrainingContext, step: int) -> torch.Tensor:
        """The main half's loss on this micro-step's batch; the batch, noise and timesteps are kept in
        ``self._shared`` for the auxiliary loss of the same micro-step."""
        generator = ctx.generator(step)
        batch = ctx.sample(ctx.instance, ctx.config.train_batch_size, generator)
        noise, t = ctx.draw_noise(batch.latents, generator)
        self.plp.isolate(self.main_side if self.b4m.mcp_isolation else None)
        main = ctx.denoising_loss(batch, generator, noise=noise, timesteps=t)
        self._shared = (step, generator, batch, noise, t)
        ctx.logs.update(loss_main=float(main.detach()))
        return main

    def before_forward(self, ctx: TrainingContext, step: int) -> None:
        """The main half's own update (official code: A on the main loss, clipped and stepped, before B's loss is
        computed with the updated A). It runs outside the loop's wrapped forward, because it has its own backward
        and step. Under several processes a backward outside the wrapped forward breaks DDP's gradient sync, so
        there the break needs ``sequential_break=False`` (one joint step on the summed losses)."""
        if not self.b4m.sequential_break:
            return
        if ctx.accelerator.num_processes > 1:
            raise ConfigError("B4M's sequential break update cannot run on several processes; pass "
                              "--no_sequential_break (one joint step on the main and auxiliary losses)")
        with ctx.accelerator.autocast():
            main = self._main_loss(ctx, step)
        self._step(ctx, main)
        self.plp.isolate(None)

    def training_loss(self, ctx: TrainingContext, step: int) -> torch.Tensor:
        """The auxiliary loss, computed with the main half :meth:`before_forward` just updated, on the same noise
        and timesteps; returned for the loop's own backward, clip and step. Without ``sequential_break``: the
        main and auxiliary losses summed, for one joint step."""
        main = None
        if not self.b4m.sequential_break:
            main = self._main_loss(ctx, step)
        elif self._shared is None or self._shared[0] != step:
            self.before_forward(ctx, step)
        _, generator, batch, noise, t = self._shared
        self.plp.isolate(self.aux_side if self.b4m.mcp_isolation else None)
        size = ctx.config.train_batch_size
        aux = sum(ctx.denoising_loss(ctx.sample(data, size, generator, like=batch), generator, noise=noise,
                                     timesteps=t)
                  for data in self.aux) / max(1, len(self.aux))
        self.plp.isolate(None)
        ctx.logs.update(loss_aux=float(aux.detach()))
        return aux if main is None else main + aux

    def _step(self, ctx: TrainingContext, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss`` alone (per micro-batch), with its own gradient clip; the other half has no
        gradient, so AdamW leaves it and its moments untouched."""
        accelerator = ctx.accelerator
        accelerator.backward(loss)
        params = [p for group in ctx.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if accelerator.num_processes > 1:
            for parameter in params:
                parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
        if ctx.config.max_grad_norm:
            accelerator.clip_grad_norm_(params, ctx.config.max_grad_norm)
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)

    def export(self, ctx: TrainingContext) -> list[Path]:
        adapter = self.plp.adapter_file()
        trigger = self.b4m.content_trigger if self.main == "content" else self.b4m.style_trigger
        adapter.metadata = b4m_metadata(ctx, self.main, [trigger], self.started_at, self.basis_path, self.b4m.rank)
        return [save_adapter(adapter, output_path(ctx), layout=ctx.config.export_layout,
                         precision=ctx.config.save_precision)]


class B4MMake(_PLPMethod):
    """Assemble [B_f ; B_l^style]·[A_f | A_l^content] and fine-tune jointly on content and style batches."""

    name = "b4m"

    def __init__(self, b4m: B4MConfig, basis_path: Path, content_file: Path, style_file: Path) -> None:
        self.b4m = b4m
        self.basis_path = basis_path
        self.content_file, self.style_file = content_file, style_file
        self.plp: PLPAdapter | None = None
        self.style: EncodedSet | None = None
        self.started_at = 0.0

    def setup(self, ctx: TrainingContext) -> list[dict[str, Any]]:
        self.started_at = time.time()
        basis = load_file(str(self.basis_path))
        content, style = read_adapter(self.content_file), read_adapter(self.style_file)
        made = dict(basis)
        for key in [k for k in basis if k.endswith(".A_frozen")]:
            path = key.removesuffix(".A_frozen")
            half_in = basis[f"{path}.A_frozen"].shape[1]
            half_out = basis[f"{path}.B_frozen"].shape[0]
            c, s = content.modules["unet"][path], style.modules["unet"][path]
            for run, module in (("content", c), ("style", s)):
                if not (torch.equal(module.down[:, :half_in], basis[f"{path}.A_frozen"])
                        and torch.equal(module.up[:half_out], basis[f"{path}.B_frozen"])):
                    raise ConfigError(f"B4M make: the {run} adapter's frozen halves of {path} differ from the basis")
            made[f"{path}.A_learn"] = c.down[:, half_in:].clone()  # the content run's learned down half, kept
            made[f"{path}.B_learn"] = s.up[half_out:].clone()
        ctx.base.pipe.unet.requires_grad_(False)
        self.plp = PLPAdapter(ctx.base.pipe.unet, made)
        self.style = encode_folder(ctx, self.b4m.style, self.b4m.style_prompt)
        rate = self.b4m.make_learning_rate or self.b4m.learning_rate
        return [{"params": self.plp.halves("A") + self.plp.halves("B"), "lr": rate}]

    def training_loss(self, ctx: TrainingContext, step: int) -> torch.Tensor:
        generator = ctx.generator(step)
        content = ctx.sample(ctx.instance, ctx.config.train_batch_size, generator)
        noise, t = ctx.draw_noise(content.latents, generator)
        style = ctx.sample(self.style, ctx.config.train_batch_size, generator, like=content)
        loss_c = ctx.denoising_loss(content, generator, noise=noise, timesteps=t)
        loss_s = ctx.denoising_loss(style, generator, noise=noise, timesteps=t)
        ctx.logs.update(loss_content=float(loss_c.detach()), loss_style=float(loss_s.detach()))
        return loss_c + loss_s

    def before_step(self, ctx: TrainingContext, step: int) -> None:
        """Riemannian preconditioning (Zhang & Pilanci 2024) of each layer's learnable halves."""
        if self.b4m.make_optimizer != "riemannian":
            return
        lam = self.b4m.riemannian_lambda
        for layer in self.plp.layers.values():
            a, b = layer.down.weight.detach().flatten(1), layer.up.weight.detach().flatten(1)  # (r, in·k·k), (out, r)
            eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
            a_learn, b_learn = layer.learnable("A"), layer.learnable("B")
            if b_learn.grad is not None:
                grad = b_learn.grad.flatten(1)
                b_learn.grad = torch.linalg.solve(a @ a.T + lam * eye, grad.T).T.reshape(b_learn.shape)
            if a_learn.grad is not None:
                grad = a_learn.grad.flatten(1)
                a_learn.grad = torch.linalg.solve(b.T @ b + lam * eye, grad).reshape(a_learn.shape)

    def export(self, ctx: TrainingContext) -> list[Path]:
        adapter = self.plp.adapter_file()
        adapter.metadata = b4m_metadata(ctx, "content+style", [self.b4m.content_trigger, self.b4m.style_trigger],
                                        self.started_at, self.basis_path, self.b4m.rank)
        return [save_adapter(adapter, output_path(ctx), layout=ctx.config.export_layout,
                         precision=ctx.config.save_precision)]


def b4m_metadata(ctx: TrainingContext, kind: str, triggers: list[str], started_at: float, basis: Path,
                 rank: int) -> dict[str, str]:
    config = ctx.config
    return adapter_metadata(
        ctx.base, name=config.output, method="b4m", kind=kind, rank=rank, alpha=rank, trigger_words=triggers,
        seed=config.seed, steps=steps_run(ctx), max_steps=config.max_train_steps, started_at=started_at,
        tag_frequency=tag_frequency(ctx.images), num_images=len(ctx.images), learning_rate=trained_learning_rate(ctx),
        resolution=config.resolution or ctx.base.default_size,
        extra={"learning_rates": optimizer_learning_rates(ctx.optimizer), "b4m_basis": basis.name,
               "b4m_stage": "make" if kind == "content+style" else f"break-{kind}"},
    )


def train_b4m(b4m: B4MConfig, config: TrainConfig, base=None, progress=None,
              should_stop: Callable[[], bool] | None = None) -> list[Path]:
    """The three B4M runs on one base: content break, style break, make. Returns [content, style, made].

    ``should_stop`` (the app's Stop button) ends the running stage early, writes its adapter, and starts no later
    stage, so a stop returns only the files of the stages begun."""
    if b4m.content is None or b4m.style is None:
        raise ConfigError("B4M needs --content DIR and --style DIR")
    if b4m.rank < 1 or b4m.break_steps < 1 or b4m.make_steps < 0:
        raise ConfigError(f"B4M needs rank ≥ 1, break steps ≥ 1 and make steps ≥ 0 (0: assemble only), not "
                          f"{b4m.rank}, {b4m.break_steps} and {b4m.make_steps}")
    b4m = replace(b4m, content_prompt=b4m.content_prompt or f"a {b4m.content_trigger} shape",
                  style_prompt=b4m.style_prompt or f"a shape in {b4m.style_trigger} style")
    for folder, prompt in ((b4m.content, b4m.content_prompt), (b4m.style, b4m.style_prompt)):  # before rendering
        check_training_input(replace(config, images=folder, instance_prompt=prompt), base)
    for folder in b4m.aux_style + b4m.aux_content:
        check_training_input(replace(config, images=folder, instance_prompt=None, random_flip=False), base)
    base = base or load_base(config.model, device=config.device)
    output_dir, work = config.output_folder(), config.work_folder()
    work.mkdir(parents=True, exist_ok=True)
    basis_path = work / f"{config.output}.b4m-basis.safetensors"
    recipe = {"studio.base_fingerprint": base.fingerprint, "studio.b4m_rank": str(b4m.rank),
              "studio.b4m_plp_split": "0.5", "studio.b4m_prior": b4m.prior, "studio.b4m_seed": str(config.seed),
              "studio.b4m_targets": ",".join(b4m.target_modules), "studio.b4m_prior_rows": str(b4m.prior_rows)}

    def aux(kind: str, given: list[Path], render: bool) -> list[Path]:
        if given:
            return list(given)
        trigger = b4m.style_trigger if kind == "style" else b4m.content_trigger
        if base.family == "tiny":
            return procedural_aux_sets(kind, work, b4m.aux_images_per_set, config.seed, trigger, render)
        return generated_aux_sets(base, kind, work, b4m.aux_images_per_set, config.seed, trigger, render)

    state = PartialState(cpu=base.device.type == "cpu")
    with state.main_process_first():  # under accelerate launch one process writes these, the others read them
        if config.resume_from_checkpoint and basis_path.exists():
            check_basis_recipe(basis_path, recipe)
        elif state.is_main_process:  # a new run draws its own basis, never an earlier run's under the same name
            save_basis(make_basis(base.pipe.unet, b4m.rank, config.seed, tuple(b4m.target_modules), b4m.prior,
                                  b4m.prior_rows), basis_path, recipe)
        aux_style = aux("style", b4m.aux_style, state.is_main_process)
        aux_content = aux("content", b4m.aux_content, state.is_main_process)

    runs = []
    for main, folder, prompt, aux_sets in (
        ("content", b4m.content, b4m.content_prompt, aux_style),
        ("style", b4m.style, b4m.style_prompt, aux_content),
    ):
        stage = replace(config, images=folder, instance_prompt=prompt, output=f"{config.output}-{main}",
                        max_train_steps=b4m.break_steps, kind=main, output_dir=output_dir,
                        trigger_words=[b4m.content_trigger if main == "content" else b4m.style_trigger])
        runs += train(_resumable(stage), B4MBreak(main, b4m, basis_path, aux_sets), progress, base,
                      should_stop).outputs
        if should_stop is not None and should_stop():
            return runs
    content_file = output_dir / f"{config.output}-content.safetensors"
    style_file = output_dir / f"{config.output}-style.safetensors"
    make = replace(config, images=b4m.content, instance_prompt=b4m.content_prompt, max_train_steps=b4m.make_steps,
                   output_dir=output_dir, kind="content")
    runs += train(_resumable(make), B4MMake(b4m, basis_path, content_file, style_file), progress, base,
                  should_stop).outputs
    return runs


def _resumable(stage: TrainConfig) -> TrainConfig:
    """``--resume_from_checkpoint latest`` resumes each stage that left a checkpoint; a stage the interrupted run
    never reached starts afresh."""
    if stage.resume_from_checkpoint == "latest" and not checkpoint_dirs(stage.work_folder()):
        return replace(stage, resume_from_checkpoint=None)
    return stage
