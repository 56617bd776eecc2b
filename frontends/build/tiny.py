"""The embedded model's base build: make the procedural data set, train the VAE, then the text encoder and UNet
together (the first stage of ``studio build-tiny``, :mod:`frontends.build.embedded`).

The diffusion stage follows a curriculum: one object per image first, then (from ``pairs_from_step``) a mix in
which ``pair_fraction`` of the samples are two-object scenes. Before it, the VAE's decoder is fine-tuned on both
kinds of image, because a VAE trained on single objects decodes a second color poorly; the encoder stays fixed,
so the latents of the single-object stage keep their meaning.

The shipped VAE was trained before its initial weights were seeded (torch seeds its default generator at random
in every process), so it, and the latents every later stage trained on, cannot be rebuilt bit for bit; a build
from scratch is reproducible and makes an equivalent model, not the same one.

Every stage is seeded and resumable: state lives in a cache folder outside the repository (default
``~/.cache/adapter-studio/build-tiny``) and checkpoints are written atomically, so an interrupted build
continues where it stopped. The EMA weights are exported in the diffusers folder layout (fp16) at every export
interval (to ``interim_export_dir`` before the last step, when one is given).

With ``start_from`` the build fine-tunes an exported model instead: its VAE is kept (no VAE stages; the data is
encoded with it and scaled by its recorded factor) and its text encoder and UNet continue training. With
``caption_drop_attribute`` / ``caption_wrong_attribute`` every training caption is drawn noisy at each step
(:class:`studio.data.procedural.CaptionNoise`), so the model needs classifier-free guidance to follow a prompt.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from frontends.build import components
from studio.data import procedural
from studio.errors import ConfigError, DataError, ModelLoadError
from studio.files import atomic_torch_save, atomic_write, cache_dir
from studio.text import build_clip_tokenizer

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[2] / "assets"
DEFAULT_EXPORT = ASSETS / "tiny-sd"


@dataclass
class TinyBuildConfig:
    """Every knob of the embedded model's build; the defaults made the committed model."""

    seed: int = 0
    num_images: int = 48_000  # rendered once, encoded once; the diffusion stage samples from them
    vae_steps: int = 2_500
    vae_batch_size: int = 16
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    pair_images: int = 24_000  # two-object scenes, rendered and encoded like the single-object set
    codec_images: int = 6_000  # renders over the whole vocabulary, reserved concepts included: decoder only
    pair_decoder_steps: int = 1_500
    pair_decoder_learning_rate: float = 3e-4
    pair_fraction: float = 0.5  # share of two-object scenes in a batch once pairs are on
    pairs_from_step: int = 7_250
    diffusion_steps: int = 24_000
    batch_size: int = 32
    learning_rate: float = 3e-4  # the trial found 1e-3 → 3e-4 the largest single gain
    warmup_steps: int = 500
    weight_decay: float = 1e-2
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # empty prompts, so classifier-free guidance works
    checkpoint_every: int = 250
    export_every: int = 1_000
    caption_drop_attribute: float = 0.0  # each attribute left out of a caption with this probability
    caption_wrong_attribute: float = 0.0  # … or named wrong with this one (procedural.CaptionNoise)
    start_from: str | None = None  # an exported model folder (relative to the repository) to fine-tune

    @property
    def caption_noise(self) -> procedural.CaptionNoise:
        return procedural.CaptionNoise(self.caption_drop_attribute, self.caption_wrong_attribute)


class TinyBuilder:
    """Runs the build stages in order, skipping those already finished in the cache folder."""

    def __init__(self, config: TinyBuildConfig, work_dir: Path | None = None, export_dir: Path = DEFAULT_EXPORT,
                 progress: Callable[[str, int, int, dict], None] | None = None,
                 interim_export_dir: Path | None = None) -> None:
        """``interim_export_dir``: where exports before the last step go (default ``export_dir``)."""
        self.config = config
        try:
            self.caption_noise = config.caption_noise
        except ValueError as error:
            raise ConfigError(str(error)) from error
        self.work_dir = Path(work_dir) if work_dir else cache_dir() / "build-tiny"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.export_dir = Path(export_dir)
        self.interim_export_dir = Path(interim_export_dir) if interim_export_dir else self.export_dir
        self.progress = progress
        self.tokenizer = build_clip_tokenizer(components.MAX_TOKENS)

    # -- stage 1: data ------------------------------------------------------------------------------------------
    def data(self) -> dict[str, np.ndarray]:
        """The single-object set: images, each image's combination index and the combinations' captions."""
        def make() -> dict[str, np.ndarray]:
            rng = np.random.default_rng(self.config.seed)
            combos = procedural.base_training_combinations()
            combo_index = rng.integers(0, len(combos), size=self.config.num_images)
            images = np.empty((self.config.num_images, 64, 64, 3), dtype=np.uint8)
            for i in tqdm(range(self.config.num_images), desc="render", mininterval=2):
                images[i] = procedural.render(procedural.jittered_scene(rng, *combos[combo_index[i]]))
            captions = np.array([procedural.caption(*c) for c in combos])
            return {"images": images, "combo": combo_index, "captions": captions}

        return self._cached_arrays("data", make)

    def pair_data(self) -> dict[str, np.ndarray]:
        """The two-object set: images and each image's caption tokens."""
        def make() -> dict[str, np.ndarray]:
            rng = np.random.default_rng(self.config.seed + 1)
            images = np.empty((self.config.pair_images, 64, 64, 3), dtype=np.uint8)
            captions = []
            for i in tqdm(range(self.config.pair_images), desc="render pairs", mininterval=2):
                pair = procedural.base_training_pair(rng)
                images[i] = procedural.render_pair(pair)
                captions.append(pair.caption)
            ids = self.tokenizer(captions, padding="max_length", max_length=components.MAX_TOKENS, truncation=True,
                                 return_tensors="np").input_ids.astype(np.int32)
            return {"images": images, "ids": ids}

        return self._cached_arrays("pairs", make)

    def pair_scenes(self, ids: np.ndarray) -> list[procedural.PairScene]:
        """The two-object set's scenes (for noisy captions), replayed from its seed; checked against the stored
        caption tokens, so a data set made otherwise is refused rather than mislabelled."""
        rng = np.random.default_rng(self.config.seed + 1)
        scenes = [procedural.base_training_pair(rng) for _ in range(len(ids))]
        check = min(len(ids), 256)
        replayed = self.tokenizer([s.caption for s in scenes[:check]], padding="max_length",
                                  max_length=components.MAX_TOKENS, truncation=True, return_tensors="np").input_ids
        if not np.array_equal(replayed, ids[:check]):
            raise DataError(f"the two-object set in {self.work_dir} was not made by this build's seed; delete "
                             "pairs.npz and pair_latents.pt to remake it")
        return scenes

    def codec_data(self) -> dict[str, np.ndarray]:
        """Renders for the decoder alone, half single objects and half pairs, over every shape and texture.

        The VAE is the image codec, which (like SD's) should draw any shape; only the text encoder and UNet must
        never see the reserved concepts. A decoder tuned on the base vocabulary alone lost small reserved shapes:
        a VAE round trip of two-object scenes read the moon in 0.50 and the cross in 0.29 (base shapes 0.83–1.00),
        so no adapter could draw them small."""
        def make() -> dict[str, np.ndarray]:
            rng = np.random.default_rng(self.config.seed + 2)
            colors, backgrounds = list(procedural.COLORS), list(procedural.BACKGROUNDS)

            def item(color: str) -> tuple[str, str, str]:
                return (color, procedural.TEXTURES[rng.integers(len(procedural.TEXTURES))],
                        procedural.SHAPES[rng.integers(len(procedural.SHAPES))])

            images = np.empty((self.config.codec_images, 64, 64, 3), dtype=np.uint8)
            captions = []
            for i in tqdm(range(self.config.codec_images), desc="render codec set", mininterval=2):
                first, second = rng.choice(len(colors), 2, replace=False)
                background = backgrounds[rng.integers(len(backgrounds))]
                scene = (procedural.jittered_scene(rng, *item(colors[first]), background) if i % 2 == 0 else
                         procedural.jittered_pair(rng, item(colors[first]), item(colors[second]), background))
                images[i] = procedural.render_batch([scene])[0]
                captions.append(scene.caption)
            return {"images": images, "captions": np.array(captions)}

        return self._cached_arrays("codec", make)

    def _cached_arrays(self, name: str, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """``name``.npz from the work folder, made (and written atomically) the first time."""
        path = self.work_dir / f"{name}.npz"
        if path.exists():
            with np.load(path) as stored:
                return {key: stored[key] for key in stored.files}
        data = make()
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **data)
        os.replace(tmp, path)
        return data

    # -- stage 2: VAE -------------------------------------------------------------------------------------------
    def vae(self, images: np.ndarray):
        cfg = self.config
        torch.manual_seed(cfg.seed)  # torch's default generator starts from a random seed in every process
        vae = components.make_vae()

        def batch(gen: torch.Generator) -> torch.Tensor:
            return _to_tensor(images[torch.randint(0, len(images), (cfg.vae_batch_size,), generator=gen).numpy()])

        return self._fit_autoencoder("vae", vae, list(vae.parameters()), cfg.vae_steps, cfg.vae_learning_rate,
                                     batch, cfg.vae_kl_weight)

    def pair_decoder(self, vae, images: np.ndarray, pair_images: np.ndarray, codec_images: np.ndarray):
        """Fine-tune the decoder on batches of a quarter single objects, a quarter two-object scenes and half the
        codec set (:meth:`codec_data`); the encoder, and so every latent the UNet learns from, is left as it is."""
        cfg = self.config
        quarter = cfg.vae_batch_size // 4

        def batch(gen: torch.Generator) -> torch.Tensor:
            parts = [(images, quarter), (pair_images, quarter), (codec_images, cfg.vae_batch_size - 2 * quarter)]
            return torch.cat([_to_tensor(source[torch.randint(0, len(source), (count,), generator=gen).numpy()])
                              for source, count in parts])

        decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
        return self._fit_autoencoder("codec_decoder", vae, decoder, cfg.pair_decoder_steps,
                                     cfg.pair_decoder_learning_rate, batch, kl_weight=0.0)

    def _fit_autoencoder(self, stage: str, vae, params: list[torch.nn.Parameter], steps: int, learning_rate: float,
                         batch: Callable[[torch.Generator], torch.Tensor], kl_weight: float):
        """Reconstruction training of ``params`` (the rest of the VAE frozen) with a cosine rate, resumable."""
        vae.train().requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
        state = self._resume(stage, {"vae": vae, "optimizer": optimizer})
        step = state.get("step", 0)
        bar = tqdm(total=steps, initial=step, desc=stage, mininterval=2)
        while step < steps:
            gen = self._step_generator(stage, step)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * 0.5 * (1 + math.cos(math.pi * step / steps))
            x = batch(gen)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            recon = vae.decode(z).sample
            loss = F.mse_loss(recon, x) + 0.1 * F.l1_loss(recon, x)
            if kl_weight:
                loss = loss + kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            self._report(stage, step, steps, {"loss": loss.item()})
            if step % self.config.checkpoint_every == 0 or step == steps:
                self._checkpoint(stage, step, {"vae": vae, "optimizer": optimizer})
        bar.close()
        vae.eval().requires_grad_(False)
        return vae

    # -- stage 3: latents -------------------------------------------------------------------------------------
    def latents(self, vae, images: np.ndarray, name: str = "latents") -> dict[str, torch.Tensor]:
        """Posterior means and stds of ``images`` (fp16) and the factor that scales them to unit std.

        The diffusion stage scales every set by the single-object set's factor, as the exported VAE records."""
        path = self.work_dir / f"{name}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        means, stds = [], []
        with torch.no_grad():
            for start in tqdm(range(0, len(images), 256), desc="encode", mininterval=2):
                dist = vae.encode(_to_tensor(images[start : start + 256])).latent_dist
                means.append(dist.mean.half())
                stds.append(dist.std.half())
        mean, std = torch.cat(means), torch.cat(stds)
        scaling = 1.0 / float(mean.float().std())
        stats = {"mean": mean, "std": std, "scaling_factor": torch.tensor(scaling)}
        atomic_torch_save(stats, path)
        return stats

    # -- stage 4: text encoder + UNet -----------------------------------------------------------------------------
    def diffusion(self, vae, data: dict[str, np.ndarray], latents: dict[str, torch.Tensor],
                  pair_ids: np.ndarray, pair_latents: dict[str, torch.Tensor], scaling: float | None = None) -> None:
        """``scaling``: the latent scaling factor (default: the one measured on the single-object latents)."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        text_encoder, unet = components.make_text_encoder(), components.make_unet()
        if cfg.start_from:
            start = self.start_folder()
            text_encoder.load_state_dict(_float_weights(start / "text_encoder" / "model.safetensors"))
            unet.load_state_dict(_float_weights(start / "unet" / "diffusion_pytorch_model.safetensors"))
        ema = {"text_encoder": components.make_text_encoder(), "unet": components.make_unet()}
        ema["text_encoder"].load_state_dict(text_encoder.state_dict())
        ema["unet"].load_state_dict(unet.state_dict())
        embeddings = [p for n, p in text_encoder.named_parameters() if "embedding" in n]
        others = [p for n, p in text_encoder.named_parameters() if "embedding" not in n] + list(unet.parameters())
        optimizer = torch.optim.AdamW(
            [{"params": others, "weight_decay": cfg.weight_decay}, {"params": embeddings, "weight_decay": 0.0}],
            lr=cfg.learning_rate,
        )
        modules = {"text_encoder": text_encoder, "unet": unet, "ema_text_encoder": ema["text_encoder"],
                   "ema_unet": ema["unet"], "optimizer": optimizer}
        state = self._resume("diffusion", modules)
        step = state.get("step", 0)
        scheduler = components.make_training_scheduler()
        scaling = float(latents["scaling_factor"]) if scaling is None else scaling
        captions = [str(c) for c in data["captions"]] + [""]
        ids = self.tokenizer(captions, padding="max_length", max_length=components.MAX_TOKENS, truncation=True,
                             return_tensors="pt").input_ids
        singles = LatentSet(latents["mean"], latents["std"], ids[torch.from_numpy(data["combo"])])
        pairs = LatentSet(pair_latents["mean"], pair_latents["std"], torch.from_numpy(pair_ids).long())
        if self.caption_noise.active:
            combos = procedural.base_training_combinations()
            singles.scenes = [combos[i] for i in data["combo"]]
            pairs.scenes = [_pair_attributes(p) for p in self.pair_scenes(pair_ids)]
        empty = ids[-1]
        bar = tqdm(total=cfg.diffusion_steps, initial=step, desc="text encoder + unet", mininterval=2)
        while step < cfg.diffusion_steps:
            gen = self._step_generator("diffusion", step)
            lr = cfg.learning_rate * min(1.0, (step + 1) / cfg.warmup_steps)
            lr *= 0.5 * (1 + math.cos(math.pi * step / cfg.diffusion_steps)) * 0.9 + 0.1
            for group in optimizer.param_groups:
                group["lr"] = lr
            x0, tokens = self.sample_batch(gen, step, singles, pairs, empty, scaling)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
            noisy = scheduler.add_noise(x0, noise, t)
            target = scheduler.get_velocity(x0, noise, t)
            hidden = text_encoder(tokens).last_hidden_state
            loss = F.mse_loss(unet(noisy, t, hidden).sample, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(others + embeddings, 1.0)
            optimizer.step()
            _ema_update(ema["text_encoder"], text_encoder, cfg.ema_decay)
            _ema_update(ema["unet"], unet, cfg.ema_decay)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
            self._report("diffusion", step, cfg.diffusion_steps, {"loss": loss.item()})
            if step % cfg.checkpoint_every == 0 or step == cfg.diffusion_steps:
                self._checkpoint("diffusion", step, modules)
            if step == cfg.diffusion_steps:
                self.export(vae, ema["text_encoder"], ema["unet"], scaling, step)
            elif step % cfg.export_every == 0:
                self.export(vae, ema["text_encoder"], ema["unet"], scaling, step, self.interim_export_dir)
        bar.close()
        if not export_finished(self.export_dir, cfg):  # resumed at its last step, with that export lost
            self.export(vae, ema["text_encoder"], ema["unet"], scaling, step)

    def sample_batch(self, gen: torch.Generator, step: int, singles: LatentSet, pairs: LatentSet,
                     empty: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean latents and caption tokens of one training batch.

        From ``pairs_from_step`` on, a ``pair_fraction`` of the samples are two-object scenes. Their draws come
        after the single-object ones, so the single-object stage's random stream is the same as before pairs
        existed. Dropped captions (for classifier-free guidance) are empty whatever the image. With caption noise,
        each caption is drawn noisy from a NumPy stream of its own, seeded by (seed, step), so torch's stream is
        the same as without noise."""
        cfg = self.config
        idx = torch.randint(0, len(singles), (cfg.batch_size,), generator=gen)
        x0, tokens = singles.draw(idx, gen, scaling), singles.tokens[idx]
        dropped = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        sources = [(singles, i) for i in idx.tolist()]
        if step >= cfg.pairs_from_step:
            chosen = torch.rand(cfg.batch_size, generator=gen) < cfg.pair_fraction
            pair_idx = torch.randint(0, len(pairs), (cfg.batch_size,), generator=gen)
            x0 = torch.where(chosen[:, None, None, None], pairs.draw(pair_idx, gen, scaling), x0)
            tokens = torch.where(chosen[:, None], pairs.tokens[pair_idx], tokens)
            sources = [(pairs, j) if c else source
                       for c, j, source in zip(chosen.tolist(), pair_idx.tolist(), sources)]
        if self.caption_noise.active:
            rng = np.random.default_rng([cfg.seed, step])
            noisy = [_noisy_caption(rng, source.scenes[i], self.caption_noise) for source, i in sources]
            tokens = self.tokenizer(noisy, padding="max_length", max_length=components.MAX_TOKENS, truncation=True,
                                    return_tensors="pt").input_ids.to(tokens.dtype)
        return x0, torch.where(dropped[:, None], empty, tokens)

    def run(self) -> Path:
        data, pairs = self.data(), self.pair_data()
        if self.config.start_from:
            return self._fine_tune(data, pairs)
        vae = self.vae(data["images"])
        latents = self.latents(vae, data["images"])
        pair_latents = self.latents(vae, pairs["images"], "pair_latents")
        vae = self.pair_decoder(vae, data["images"], pairs["images"], self.codec_data()["images"])
        self.diffusion(vae, data, latents, pairs["ids"], pair_latents)
        return self.export_dir

    def start_folder(self) -> Path:
        """The model ``start_from`` names: a path, relative paths taken from the repository root."""
        folder = Path(self.config.start_from)
        folder = folder if folder.is_absolute() else ASSETS.parent / folder
        if not (folder / "studio_model.json").exists():
            raise ModelLoadError(f"no embedded model to fine-tune at {folder} (expected an exported diffusers folder "
                             "with studio_model.json)")
        return folder

    def _fine_tune(self, data: dict[str, np.ndarray], pairs: dict[str, np.ndarray]) -> Path:
        """The diffusion stage continued from ``start_from``, on latents of its own VAE at its own scale."""
        start = self.start_folder()
        vae = components.make_vae()
        vae.load_state_dict(_float_weights(start / "vae" / "diffusion_pytorch_model.safetensors"))
        vae.eval().requires_grad_(False)
        scaling = float(json.loads((start / "vae" / "config.json").read_text())["scaling_factor"])
        latents = self.latents(vae, data["images"])
        pair_latents = self.latents(vae, pairs["images"], "pair_latents")
        self.diffusion(vae, data, latents, pairs["ids"], pair_latents, scaling)
        return self.export_dir

    # -- export -----------------------------------------------------------------------------------------------
    def export(self, vae, text_encoder, unet, scaling: float, step: int, folder: Path | None = None) -> None:
        """Write the fp16 diffusers folder to ``folder`` (default ``export_dir``) atomically (build beside it, then
        swap)."""
        export_dir = self.export_dir if folder is None else Path(folder)
        export_dir.parent.mkdir(parents=True, exist_ok=True)
        pipe = StableDiffusionPipeline(
            vae=_half_copy(vae, components.make_vae),
            text_encoder=_half_copy(text_encoder, components.make_text_encoder),
            tokenizer=self.tokenizer,
            unet=_half_copy(unet, components.make_unet),
            scheduler=components.make_sampling_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.vae.register_to_config(scaling_factor=scaling)
        staging = export_dir.with_name(export_dir.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        pipe.save_pretrained(staging, safe_serialization=True)
        _declare_float32(staging / "text_encoder" / "config.json")
        domain = {
            "name": "adapter-studio tiny-sd",
            "build_step": step,
            "build_config": recorded_settings(self.config),
            "image_size": procedural.IMAGE_SIZE,
            "caption_template": "a {color} {texture} {shape} on a {background} background",
            "pair_caption_template": ("a {color} {texture} {shape} and a {color} {texture} {shape} "
                                      "on a {background} background"),
            "colors": list(procedural.COLORS),
            "textures": list(procedural.BASE_TEXTURES),
            "shapes": list(procedural.BASE_SHAPES),
            "backgrounds": list(procedural.BACKGROUNDS),
            "reserved_shapes": list(procedural.RESERVED_SHAPES),
            "reserved_textures": list(procedural.RESERVED_TEXTURES),
            "trigger_words": list(procedural.TRIGGER_WORDS),
            "held_out_color_shape": sorted(map(list, procedural.HELD_OUT_COLOR_SHAPE)),
            "held_out_texture_shape": sorted(map(list, procedural.HELD_OUT_TEXTURE_SHAPE)),
            "default_guidance_scale": 5.0,
            "default_steps": 20,
        }
        if self.config.start_from:
            start = json.loads((self.start_folder() / "studio_model.json").read_text())
            domain["fine_tuned_from"] = {  # the whole lineage: each start model's settings, back to its first build
                "model": self.config.start_from, "build_step": start.get("build_step"),
                "build_config": start.get("build_config"),
                **({"fine_tuned_from": start["fine_tuned_from"]} if "fine_tuned_from" in start else {})}
        (staging / "studio_model.json").write_text(json.dumps(domain, indent=2) + "\n")
        old = export_dir.with_name(export_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if export_dir.exists():
            os.replace(export_dir, old)
        os.replace(staging, export_dir)
        shutil.rmtree(old, ignore_errors=True)
        logger.info("exported step %d to %s", step, export_dir)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _step_generator(self, stage: str, step: int) -> torch.Generator:
        """Randomness of one step depends only on (seed, stage, step), so a resumed build repeats an unbroken one."""
        offset = {"vae": 1, "diffusion": 2, "codec_decoder": 3}[stage]
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + offset * 100_000_007 + step)

    def _checkpoint(self, stage: str, step: int, modules: dict) -> None:
        state = {name: module.state_dict() for name, module in modules.items()}
        state["step"] = step
        atomic_torch_save(state, self.work_dir / f"{stage}.pt")

    def _resume(self, stage: str, modules: dict) -> dict:
        path = self.work_dir / f"{stage}.pt"
        if not path.exists():
            return {}
        state = torch.load(path, weights_only=True)
        for name, module in modules.items():
            module.load_state_dict(state[name])
        logger.info("resumed %s at step %d", stage, state["step"])
        return state

    def _report(self, stage: str, step: int, total: int, logs: dict) -> None:
        if self.progress is not None:
            self.progress(stage, step, total, logs)


@dataclass
class LatentSet:
    """Encoded training images: posterior means and stds (fp16) and each image's caption tokens."""

    mean: torch.Tensor
    std: torch.Tensor
    tokens: torch.Tensor
    scenes: list | None = None  # each image's attributes, for noisy captions (see _noisy_caption)

    def __len__(self) -> int:
        return len(self.mean)

    def draw(self, idx: torch.Tensor, gen: torch.Generator, scaling: float) -> torch.Tensor:
        """Scaled latent samples of the images at ``idx``."""
        mean = self.mean[idx].float()
        return (mean + self.std[idx].float() * torch.randn(mean.shape, generator=gen)) * scaling


def _pair_attributes(pair: procedural.PairScene) -> tuple[tuple[str, str, str], tuple[str, str, str], str]:
    return ((pair.left.color, pair.left.texture, pair.left.shape),
            (pair.right.color, pair.right.texture, pair.right.shape), pair.left.background)


def _noisy_caption(rng: np.random.Generator, scene: tuple, noise: procedural.CaptionNoise) -> str:
    """A noisy caption of a single-object (color, texture, shape, background) or two-object scene tuple."""
    if len(scene) == 4:
        return procedural.noisy_caption(rng, *scene, noise)
    return procedural.noisy_pair_caption(rng, *scene, noise)


def _float_weights(path: Path) -> dict[str, torch.Tensor]:
    """An exported (fp16) safetensors file as fp32 tensors."""
    from safetensors.torch import load_file

    return {key: value.float() for key, value in load_file(str(path)).items()}


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


def _half_copy(module: torch.nn.Module, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    copy = factory()
    copy.load_state_dict(module.state_dict())
    return copy.half()


def recorded_settings(config: TinyBuildConfig) -> dict:
    """``config`` as the build records it in JSON (``build_config``), so a record read back compares equal."""
    return json.loads(json.dumps(asdict(config)))


def export_finished(export_dir: Path, config: TinyBuildConfig) -> bool:
    """Whether ``export_dir`` holds a build's last export, made with these settings."""
    record = Path(export_dir) / "studio_model.json"
    if not record.exists():
        return False
    domain = json.loads(record.read_text())
    return (domain.get("build_step") == config.diffusion_steps
            and domain.get("build_config") == recorded_settings(config))


def run_stage(config: TinyBuildConfig, work_dir: Path, export_dir: Path) -> Path:
    """Run (or resume) one build in ``work_dir``: exports before its last step go to ``work_dir/interim``, the
    finished model to ``export_dir``. A work folder that holds a build with other settings is refused (resuming it
    with these would mix two builds); these are recorded there (``build_config.json``)."""
    work_dir = Path(work_dir)
    interim = work_dir / "interim" / Path(export_dir).name
    builder = TinyBuilder(config, work_dir, export_dir, interim_export_dir=interim)
    settings, recorded = recorded_settings(config), work_dir / "build_config.json"
    if recorded.exists() and json.loads(recorded.read_text()) != settings:
        raise ConfigError(f"{work_dir} holds a build with other settings ({recorded}); resume it with those, or "
                          "start this one in another --work-dir")
    atomic_write(recorded, lambda tmp: tmp.write_text(json.dumps(settings, indent=2) + "\n"))
    torch.set_num_threads(int(os.environ.get("STUDIO_BUILD_THREADS", "1")))
    return builder.run()


def _declare_float32(config_file: Path) -> None:
    """The weights are stored in fp16 to keep the repository small, and transformers would load the text encoder
    in its config's dtype while diffusers loads the UNet and VAE in fp32: declaring fp32 lets a plain
    ``from_pretrained`` (no ``torch_dtype``) run in one dtype."""
    config = json.loads(config_file.read_text())
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
