"""Adapter Studio web app: layout and thin handlers; all model logic lives in studio/, pipelines/, trainers/."""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
import torch
from PIL import Image

from frontends.cli import add_app_flags
from frontends.compare import compare_methods
from frontends.generate import GenerationRequest, generate, request_from_png
from pipelines.loading import load_base
from pipelines.methods import METHODS
from pipelines.upscalers import choices as upscaler_choices
from studio.adapters.file import read_adapter
from studio.adapters.library import (
    AdapterSummary,
    delete_adapter,
    export_adapter,
    import_adapter,
    library_dir,
    list_adapters,
    resolve_adapter,
)
from studio.adapters.weights import scalar_weight
from studio.data.autocaption import Captioner, caption_folder
from studio.data.folder import caption_rows, write_captions
from studio.errors import ConfigError, StudioError
from studio.eval.domain import DomainEvaluator
from studio.models import EMBEDDED_NAMES, BaseModel
from studio.png import default_outputs, numbered_png, save_png
from studio.samplers import SAMPLERS, SCHEDULE_FLAGS
from studio.text import split_words
from trainers import TRAINERS, TrainConfig
from trainers import run as run_trainer
from trainers.b4m import B4MConfig
from trainers.dataset import resolution_of
from trainers.recipe import TrainForm, default_prompts, measure_step_seconds, training_config
from trainers.sara import SaraConfig

OUTPUTS = default_outputs()
ROWS = 4  # adapter stack rows, as in Fooocus
MODEL_SAMPLER = "Model default"
SAMPLER_CHOICES = [MODEL_SAMPLER, *SAMPLERS]
LIBRARY_COLUMNS = ["name", "kind", "method", "trigger words", "rank", "frequency", "base", "file"]


class Studio:
    """Server-side state: the loaded base (reloaded only when the user picks another) and the stop flags."""

    def __init__(self, model: str | None = None) -> None:
        self.model_spec = model
        self._base: BaseModel | None = None
        self.stop_training = threading.Event()
        self.stop_generation = threading.Event()
        self.lock = threading.Lock()

    def base(self, spec: str | None = None) -> BaseModel:
        spec = (spec or "").strip() or None
        if self._base is None or spec != self.model_spec:
            self._base = load_base(spec)
            self.model_spec = spec
        return self._base

    # -- compose ---------------------------------------------------------------------------------------------
    def request(self, rows: Sequence[Any], prompt: str, negative: str, method: str, switch_interval: float,
                cache_interval: float, clora_words: str, clora_fill: bool, perp_neg: bool, perp_neg_weight: float,
                decor_words: str,
                decor_alpha: float, seed: float, randomize: bool, steps: float, guidance: float, size: float,
                batch: float, sampler: str = MODEL_SAMPLER, schedule: str = "Automatic", clip_skip: float = 1,
                init: Any = None, strength: float = 0.75, hires_scale: float = 1.0, hires_steps: float = 0,
                hires_strength: float = 0.7, hires_upscaler: str = "Latent", mask_blur: float = 4.0
                ) -> GenerationRequest:
        if not prompt.strip():
            raise gr.Error("Write a prompt first.")
        adapters, adapter_prompts = [], []
        for index in range(ROWS):
            enabled, name, weight, own_prompt = rows[4 * index : 4 * index + 4]
            if not enabled or not name:
                continue
            try:
                value = scalar_weight(weight, f"adapter row {index + 1}: weight")
            except ConfigError as error:
                raise gr.Error(f"{str(error)[0].upper()}{str(error)[1:]}.") from error
            adapters.append((str(name), value))
            adapter_prompts.append(own_prompt or prompt)
        options: dict[str, Any] = {}
        if method == "switch":
            options["interval"] = int(switch_interval)
        elif method == "cmlora":
            options["cache_interval"] = int(cache_interval)
        elif method == "clora":
            groups = [split_words(part) for part in clora_words.split("|")]
            if any(groups):
                options["groups"] = groups  # the pipeline checks them against the adapters and the prompt
            if clora_fill:
                options["uncovered"] = "adapters"
        if perp_neg and not negative.strip():
            raise gr.Error("Perp-Neg needs a negative prompt.")
        return GenerationRequest(
            prompt=prompt, negative_prompt=negative if not perp_neg else "", seed=random.randrange(2**31)
            if randomize else int(seed), steps=int(steps), guidance_scale=float(guidance), width=int(size),
            height=int(size), num_images=int(batch), adapters=adapters, method=method if adapters else "merge",
            method_options=options, perp_neg=[(negative, float(perp_neg_weight))] if perp_neg else [],
            decor_remove=split_words(decor_words), decor_alpha=float(decor_alpha),
            adapter_prompts=adapter_prompts if method == "clora" else [],
            sampler=None if sampler == MODEL_SAMPLER else sampler, schedule=schedule, clip_skip=int(clip_skip),
            **_init_fields(init), strength=float(strength), hires_scale=float(hires_scale),
            hires_steps=int(hires_steps) or None, hires_strength=float(hires_strength), hires_upscaler=hires_upscaler,
            mask_blur=float(mask_blur),
        )

    def generate(self, model: str, *values: Any, progress: gr.Progress = gr.Progress()):  # noqa: B008
        rows, rest = values[: 4 * ROWS], values[4 * ROWS :]
        request = self.request(rows, *rest)
        progress(0, desc="loading model")
        self.stop_generation.clear()
        try:
            base = self.base(model)
            gallery, masks = [], []
            for index in progress.tqdm(range(request.num_images), desc="generating"):
                if self.stop_generation.is_set():
                    break
                single = replace(request, seed=request.seed + index, num_images=1)
                result = generate(base, single)[0]
                path = save_png(result.image, _output_path(result.recipe["seed"]), result.parameters, result.recipe)
                gallery.append((str(path), result.parameters))
                masks += _mask_images(result.masks)
        except StudioError as error:
            raise gr.Error(str(error)) from error
        modes = (("inpaint" if request.mask else "img2img", request.init_image),
                 ("hires fix", request.hires_scale > 1),
                 ("Perp-Neg", request.perp_neg), ("DECOR", request.decor_remove))
        extras = [label for label, used in modes if used]
        stopped = " · stopped" if self.stop_generation.is_set() else ""
        return gallery, masks, " · ".join([f"{len(gallery)} image(s)", f"seed {request.seed}", request.method,
                                           *extras]) + stopped

    def compare(self, model: str, *values: Any, progress: gr.Progress = gr.Progress()):  # noqa: B008
        rows, rest = values[: 4 * ROWS], values[4 * ROWS :]
        request = self.request(rows, *rest)
        if not request.adapters:
            raise gr.Error("Enable at least one adapter to compare composition methods.")
        try:
            base = self.base(model)
            evaluator = DomainEvaluator.load() if base.family == "tiny" else None
            gallery = []
            for item in compare_methods(base, request, tuple(METHODS), evaluator):
                path = save_png(item.result.image, _output_path(request.seed), item.result.parameters,
                                item.result.recipe)
                scores = ", ".join(f"{k}: {v or 'rejected'}" for k, v in item.scores.items())
                gallery.append((str(path), f"{item.method} — {scores}" if scores else item.method))
        except StudioError as error:
            raise gr.Error(str(error)) from error
        return gallery

    # -- train -------------------------------------------------------------------------------------------------
    def train(self, model: str, files: list[Any] | None, captions: Any, style_files: list[Any] | None,
              method: str, kind: str, trigger: str, steps: float, rank: float, learning_rate: float,
              threshold: float, decor_words: str, b4m_prior: str = "square", form: TrainForm | None = None,
              folder_text: str = "") -> Iterator[tuple[Any, ...]]:
        """Train on the uploads (or, with none, on the image folder named on this machine); yields the status,
        the previews, the library views and the loss plot."""
        folder_text = (folder_text or "").strip()
        if not files and not folder_text:
            raise gr.Error("Upload a handful of images (3–20) first, or name an image folder on this machine.")
        if method == "b4m" and not style_files:
            raise gr.Error("Break-for-Make needs style images too.")
        if not trigger.strip():
            raise gr.Error("Give the adapter a trigger word, e.g. sks.")
        self.stop_training.clear()
        folder = _staged_images(files, captions) if files else None
        style = _staged_images(style_files, None) if method == "b4m" else None
        name = _free_name(f"{trigger.strip()}-{method}-{kind}")
        events: queue.Queue = queue.Queue()
        outcome: dict[str, Any] = {}

        def progress(event: str, step: int, total: int, logs: dict) -> None:
            events.put((event, step, total, logs))

        def work() -> None:
            try:
                base = self.base(model)
                config = training_config(base, form or TrainForm(), folder or Path(folder_text), kind, trigger,
                                         int(steps), int(rank), float(learning_rate), decor_words, name)
                seconds = measure_step_seconds(base, resolution_of(config, base.default_size),
                                               config.train_batch_size)
                events.put(("estimate", 0, int(steps), {"seconds": seconds}))
                outcome["paths"] = run_training(base, method, config, style, float(threshold), progress,
                                                self.stop_training.is_set, b4m_prior)
            except Exception as error:  # reported in the page; the app keeps serving
                outcome["error"] = error
            finally:
                for staged in (folder, style):
                    if staged is not None:
                        shutil.rmtree(staged, ignore_errors=True)

        with self.lock:
            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            previews: list[tuple[str, str]] = []
            losses: list[tuple[int, float, str]] = []
            status, estimate = "starting", ""
            while worker.is_alive() or not events.empty():
                try:
                    event, step, total, logs = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if event == "estimate":
                    estimate = step_estimate(logs["seconds"], total)
                    status = estimate
                elif event == "step":
                    status = f"{logs['method']}: step {step}/{total} — loss {logs.get('loss', float('nan')):.4f}"
                    status += f" ({estimate})" if estimate else ""
                    losses.append((len(losses) + 1, float(logs.get("loss", float("nan"))), logs["method"]))
                elif event == "validation":
                    previews += [(p, f"step {step}") for p in logs["images"]]
                yield status, previews, *_unchanged_lists(), loss_frame(losses)
            worker.join()
        if "error" in outcome:
            raise gr.Error(f"Training failed: {outcome['error']}")
        stopped = " (stopped early)" if self.stop_training.is_set() else ""
        written = ", ".join(Path(p).name for p in outcome["paths"])
        yield f"done{stopped}: {written}", previews, *library_views(), loss_frame(losses)

    # -- library -----------------------------------------------------------------------------------------------
    def import_file(self, model: str, file: Any):
        if file is None:
            raise gr.Error("Choose a .safetensors adapter file.")
        return _library_action(lambda: import_adapter(_file_path(file), self.base(model)), "imported")

    @staticmethod
    def export_file(name: str):
        """Writes the kohya copy under exports/ and offers it for download."""
        try:
            path = export_adapter(_picked(name))
        except StudioError as error:
            raise gr.Error(str(error)) from error
        return f"wrote {path} (kohya layout, for A1111/ComfyUI)", str(path)

    @staticmethod
    def delete_file(name: str):
        return _library_action(lambda: delete_adapter(_picked(name)), "deleted")


def _picked(name: str) -> str:
    if not name:
        raise gr.Error("Pick an adapter.")
    return name


def _library_action(action, verb: str):
    """Run a library operation; studio errors become messages in the page. Returns the message and every view of
    the library (table, the rows' adapter lists, the Library tab's list)."""
    try:
        path = action()
    except StudioError as error:
        raise gr.Error(str(error)) from error
    return f"{verb} {Path(path).name}", *library_views()


def library_views() -> list[Any]:
    """Fresh values for every view of the library: its table, each Compose row's list and the Library tab's."""
    summaries = list_adapters()  # one read of every adapter file serves all the views
    choices = adapter_choices(summaries)
    return [library_table(summaries), *[gr.update(choices=choices) for _ in range(ROWS + 1)]]


def _unchanged_lists() -> list[Any]:
    """The library views left as they are (while training runs)."""
    return [gr.update() for _ in range(ROWS + 2)]


def _free_name(name: str) -> str:
    """``name``, or ``name-2``, ``name-3``… when the library already holds it: training never overwrites."""
    candidate, index = name, 2
    while (library_dir() / f"{candidate}.safetensors").exists():
        candidate, index = f"{name}-{index}", index + 1
    return candidate


def run_training(base: BaseModel, method: str, config: TrainConfig, style: Path | None, threshold: float, progress,
                 should_stop, b4m_prior: str = "square") -> list[Path]:
    """The Train tab's job: one of the studio's trainers on ``config``'s images."""
    options = None  # the method's defaults
    if method == "b4m":
        trigger = config.trigger_words[0]
        options = B4MConfig(content=config.images, style=style, content_trigger=trigger,
                            style_trigger=f"{trigger}style", content_prompt=config.instance_prompt,
                            style_prompt=default_prompts(base.family, f"{trigger}style", "style").instance,
                            rank=config.rank, break_steps=config.max_train_steps, make_steps=config.max_train_steps,
                            prior=b4m_prior)
    elif method == "sara":
        options = SaraConfig(threshold=threshold)
    return run_trainer(method, config, options, base=base, progress=progress, should_stop=should_stop)


def step_estimate(seconds: float, steps: int) -> str:
    """The measured time per step and what it makes for the whole run."""
    total = seconds * steps
    span = f"{total:.0f} s" if total < 120 else f"{total / 60:.0f} min"
    return f"≈ {seconds:.2f} s per step (measured), ≈ {span} for {steps} steps"


def loss_frame(losses: list[tuple[int, float, str]]):
    return pd.DataFrame(losses or [(0, float("nan"), "")], columns=["step", "loss", "stage"])


def form_defaults(studio: Studio, model: str, trigger: str, kind: str) -> tuple[str, str, str]:
    """The instance, validation and class prompts the selected base starts from."""
    family = "tiny" if (model or "").strip().lower() in EMBEDDED_NAMES else studio.base(model).family
    prompts = default_prompts(family, trigger, kind)
    return prompts.instance, "\n".join(prompts.validation), prompts.class_prompt


def auto_captions(model_dir: str, folder: str, files: list[Any] | None, trigger: str):
    """Caption with a captioning model on disk: the folder's images (written to their .txt files, existing ones
    kept), else the uploads (into the table, used when training starts); the trigger word leads each caption."""
    try:
        if folder.strip():
            caption_folder(folder.strip(), model_dir.strip() or None, prefix=trigger)
            return caption_rows(folder.strip())
        if not files:
            raise gr.Error("Upload images or name an image folder first.")
        captioner = Captioner(model_dir.strip() or None)
        prefix = f"{trigger.strip()}, " if trigger.strip() else ""
        return [[_file_path(f).name, prefix + captioner.caption(_file_path(f))] for f in files]
    except StudioError as error:
        raise gr.Error(str(error)) from error


def load_caption_table(folder: str):
    try:
        return caption_rows(folder.strip())
    except StudioError as error:
        raise gr.Error(str(error)) from error


def save_caption_table(folder: str, table: Any) -> str:
    rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
    try:
        written = write_captions(folder.strip(), [[str(c) if c is not None else "" for c in row] for row in rows])
    except StudioError as error:
        raise gr.Error(str(error)) from error
    return f"saved {len(written)} captions in {folder.strip()}"


# -- small helpers ---------------------------------------------------------------------------------------------


def _file_path(item: Any) -> Path:
    return Path(item if isinstance(item, str | Path) else getattr(item, "name", item["path"]))


def _staged_images(files: Sequence[Any], captions: Any) -> Path:
    """Copy uploads into a fresh folder with .txt captions from the caption table (where filled in)."""
    folder = Path(tempfile.mkdtemp(prefix="studio-train-"))
    table = {}
    if captions is not None and hasattr(captions, "values"):
        table = {str(row[0]): str(row[1]) for row in captions.values.tolist() if len(row) > 1 and row[1]}
    for item in files:
        source = _file_path(item)
        target = folder / source.name
        if target.exists():  # two uploads of the same name (e.g. 0.png from two folders): keep both
            target = folder / f"{len(list(folder.iterdir()))}-{source.name}"
        shutil.copyfile(source, target)
        if table.get(source.name):
            target.with_suffix(".txt").write_text(table[source.name])
    return folder


def _init_fields(editor: Any) -> dict[str, str | None]:
    """The img2img panel's image and painted mask (white strokes = repaint), stored under outputs/inputs by
    content, so a PNG's recipe names files that reproduce it. An empty panel is text to image."""
    background = editor.get("background") if isinstance(editor, dict) else editor
    if background is None:
        return {"init_image": None, "mask": None}
    image = (background if isinstance(background, Image.Image) else Image.open(background)).convert("RGB")
    layers = [layer if isinstance(layer, Image.Image) else Image.open(layer)
              for layer in (editor.get("layers") or [] if isinstance(editor, dict) else [])]
    painted = np.zeros((image.height, image.width), bool)
    for layer in layers:
        painted |= np.asarray(layer.convert("RGBA").resize(image.size))[..., 3] > 0
    folder = OUTPUTS / "inputs"
    folder.mkdir(parents=True, exist_ok=True)

    def store(picture: Image.Image) -> str:
        path = folder / f"{hashlib.sha256(picture.tobytes()).hexdigest()[:16]}.png"
        if not path.exists():
            picture.save(path)
        return str(path)

    mask = store(Image.fromarray(painted.astype(np.uint8) * 255)) if painted.any() else None
    return {"init_image": store(image), "mask": mask}


def _output_path(seed: int) -> Path:
    return numbered_png(OUTPUTS, seed)


def _mask_images(masks: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """CLoRA's masks of one image, as grey PNGs beside it."""
    shown = []
    for name, mask in masks.items():
        array = (mask[0].numpy() * 255).astype("uint8")
        folder = OUTPUTS / "masks"  # beside, not among, the images: `studio eval --images outputs/` reads those
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"mask-{name}-{len(list(folder.glob('mask-*.png'))):05d}.png"
        Image.fromarray(array).resize((128, 128), Image.Resampling.NEAREST).save(path)
        shown.append((str(path), "base prompt" if name.startswith("__") else name))
    return shown


def adapter_choices(summaries: Sequence[AdapterSummary] | None = None) -> list[str]:
    return [row.name for row in (list_adapters() if summaries is None else summaries)]


def library_table(summaries: Sequence[AdapterSummary] | None = None) -> list[list[str]]:
    def row(a: AdapterSummary) -> list[str]:
        return [a.name, a.kind or "", a.method, ", ".join(a.trigger_words), "/".join(map(str, a.ranks)),
                a.frequency_class or "", f"{a.base_family or ''} {a.base_fingerprint or ''}".strip(), str(a.path)]

    return [row(a) for a in (list_adapters() if summaries is None else summaries)]


def triggers_for(prompt: str, *rows: Any) -> str:
    """Append the trigger words of the enabled adapters to the prompt (from their metadata)."""
    words = []
    for index in range(ROWS):
        enabled, name = rows[2 * index], rows[2 * index + 1]
        if enabled and name:
            words += [w for w in read_adapter(resolve_adapter(name)).trigger_words if w not in prompt]
    return " ".join([prompt.strip(), *words]).strip()


def move_row(index: int, delta: int, *values: Any) -> list[Any]:
    """Swap adapter row ``index`` with its neighbour; returns every row value."""
    rows = [list(values[4 * i : 4 * i + 4]) for i in range(ROWS)]
    other = index + delta
    if 0 <= other < ROWS:
        rows[index], rows[other] = rows[other], rows[index]
    return [v for r in rows for v in r]


#: What :func:`recipe_to_form` fills after the adapter rows, named as :meth:`Studio.request`'s parameters.
RECIPE_FIELDS = ("prompt", "negative", "method", "seed", "randomize", "steps", "guidance", "size", "perp_neg",
                 "perp_neg_weight", "decor_words", "decor_alpha", "switch_interval", "cache_interval", "clora_words",
                 "clora_fill", "sampler", "schedule", "clip_skip", "init", "strength", "hires_scale", "hires_steps",
                 "hires_strength", "hires_upscaler", "mask_blur")


def _gallery_path(event: gr.SelectData, gallery: Any) -> str:
    item = gallery[event.index]
    image = item[0] if isinstance(item, list | tuple) else item
    return image.get("image", {}).get("path") if isinstance(image, dict) else image


def recipe_to_form(event: gr.SelectData, gallery: Any) -> list[Any]:
    """Send a gallery image back to the form from its PNG recipe: adapters, prompts, seed and settings, and the
    method's options, Perp-Neg and DECOR, so that Generate draws the same image again."""
    return png_to_form(_gallery_path(event, gallery))


def png_to_form(path: Any) -> list[Any]:
    """Every form value from a PNG's parameters: the studio's recipe, or the ``parameters`` text A1111 writes
    (prompt, LoRA tags, sampler and schedule, clip skip, size, denoising strength, hires fix)."""
    if path is None:
        raise gr.Error("Drop a PNG first.")
    try:
        request, _ = request_from_png(getattr(path, "name", path))
    except StudioError as error:
        raise gr.Error(str(error)) from error
    rows = []
    for index in range(ROWS):
        if index < len(request.adapters):
            own = request.adapter_prompts
            prompt = own[index] if index < len(own) and own[index] != request.prompt else ""
            rows += [True, Path(str(request.adapters[index][0])).stem, request.adapters[index][1], prompt]
        else:
            rows += [False, None, 1.0, ""]
    options = request.method_options or {}
    perp_neg = request.perp_neg
    negative = perp_neg[0][0] if perp_neg else request.negative_prompt
    init = {"background": request.init_image, "layers": [], "composite": request.init_image} \
        if request.init_image and Path(request.init_image).is_file() else None
    fields = {"prompt": request.prompt, "negative": negative, "method": request.method, "seed": request.seed,
              "randomize": False, "steps": request.steps or 20,
              "guidance": 5.0 if request.guidance_scale is None else request.guidance_scale,
              "size": request.width or 64, "perp_neg": bool(perp_neg),
              "perp_neg_weight": perp_neg[0][1] if perp_neg else 1.5, "decor_words": ", ".join(request.decor_remove),
              "decor_alpha": request.decor_alpha, "switch_interval": options.get("interval", 0),
              "cache_interval": options.get("cache_interval", 0),
              "clora_words": " | ".join(", ".join(group) for group in options.get("groups") or []),
              "clora_fill": options.get("uncovered") == "adapters", "sampler": request.sampler or MODEL_SAMPLER,
              "schedule": request.schedule or "Automatic", "clip_skip": request.clip_skip, "init": init,
              "strength": request.strength, "hires_scale": request.hires_scale,
              "hires_steps": request.hires_steps or 0, "hires_strength": request.hires_strength,
              "hires_upscaler": request.hires_upscaler, "mask_blur": request.mask_blur}
    return rows + [fields[name] for name in RECIPE_FIELDS]


def send_to_img2img(event: gr.SelectData, gallery: Any) -> tuple[dict[str, Any], float]:
    """The selected gallery image as the img2img panel's image (no mask yet) and A1111's default strength."""
    path = _gallery_path(event, gallery)
    return {"background": path, "layers": [], "composite": path}, 0.75


# -- layout ----------------------------------------------------------------------------------------------------


def build_app(model: str | None = None) -> gr.Blocks:
    studio = Studio(model)
    summaries = list_adapters()
    choices = adapter_choices(summaries)
    with gr.Blocks(title="Adapter Studio") as demo:
        gr.Markdown("# Adapter Studio")
        model_box = gr.Textbox(label="Base model (empty = the embedded tiny-sd; or a folder / .safetensors file)",
                               value=model or "")
        with gr.Tab("Compose"):
            with gr.Row():
                with gr.Column(scale=3):
                    rows: list[gr.components.Component] = []
                    movers = []
                    for index in range(ROWS):
                        with gr.Row():
                            enabled = gr.Checkbox(label="on", value=False, scale=0, elem_id=f"row{index}-on")
                            name = gr.Dropdown(choices, value=None, label=f"Adapter {index + 1}",
                                               allow_custom_value=True, scale=3, elem_id=f"row{index}-adapter")
                            weight = gr.Textbox(label="Weight", value="1.0", scale=1,
                                                elem_id=f"row{index}-weight")
                            own = gr.Textbox(label="Own prompt (CLoRA)", scale=3)
                            with gr.Column(scale=0, min_width=48):  # the two movers stacked, inside the row
                                up, down = gr.Button("↑", size="sm"), gr.Button("↓", size="sm")
                        rows += [enabled, name, weight, own]
                        movers.append((index, up, down))
                    prompt = gr.Textbox(label="Prompt", value="a red solid sks on a white background",
                                        elem_id="prompt")
                    triggers = gr.Button("Insert trigger words of the enabled adapters", size="sm")
                    negative = gr.Textbox(label="Negative prompt")
                    with gr.Row():
                        perp_neg = gr.Checkbox(label="Perp-Neg (negative keeps what it shares with the prompt)")
                        perp_weight = gr.Slider(0, 4, value=1.5, step=0.1, label="Perp-Neg weight")
                    with gr.Row():
                        method = gr.Radio(METHODS, value="merge", label="Composition method", elem_id="method")
                        switch_interval = gr.Slider(0, 20, value=0, step=1, label="Switch interval τ (0 = paper)")
                        cache_interval = gr.Slider(0, 5, value=0, step=1, label="CMLoRA cache interval (0 = paper)")
                    with gr.Row():
                        clora_words = gr.Textbox(label="CLoRA concept words, '|' between adapters (empty = triggers)",
                                                 placeholder="red | blue", scale=3)
                        clora_fill = gr.Checkbox(label="CLoRA: adapters fill what no mask covers", scale=1)
                    with gr.Row():
                        decor_words = gr.Textbox(label="DECOR: remove concepts (comma-separated)")
                        decor_alpha = gr.Slider(0, 1, value=1.0, step=0.05, label="DECOR α")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=1, precision=0)
                        randomize = gr.Checkbox(label="Random seed", value=False)
                        batch = gr.Slider(1, 16, value=2, step=1, label="Batch count")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                        guidance = gr.Slider(0, 20, value=5.0, step=0.5, label="Guidance scale")
                        size = gr.Slider(64, 1024, value=64, step=64, label="Size")
                    with gr.Row():
                        sampler = gr.Dropdown(SAMPLER_CHOICES, value=MODEL_SAMPLER, label="Sampler",
                                              elem_id="sampler")
                        schedule = gr.Dropdown(list(SCHEDULE_FLAGS), value="Automatic", label="Schedule type")
                        clip_skip = gr.Number(label="Clip skip", value=1, precision=0, minimum=1, maximum=12)
                    with gr.Accordion("img2img / inpaint", open=False, elem_id="img2img"):
                        init = gr.ImageEditor(label="Image (paint white over what to repaint; no strokes = img2img)",
                                              type="pil", height=300, elem_id="init-image",
                                              brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
                        with gr.Row():
                            strength = gr.Slider(0, 1, value=0.75, step=0.05, label="Denoising strength")
                            mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur (px)")
                    with gr.Accordion("Hires fix", open=False):
                        with gr.Row():
                            hires_scale = gr.Slider(1, 4, value=1, step=0.25, label="Upscale by (1 = off)")
                            hires_steps = gr.Slider(0, 100, value=0, step=1, label="Hires steps (0 = same)")
                            hires_strength = gr.Slider(0, 1, value=0.7, step=0.05, label="Denoising strength")
                            hires_upscaler = gr.Dropdown(
                                upscaler_choices(), value="Latent", label="Upscaler (or a model file's path)",
                                allow_custom_value=True, elem_id="hires-upscaler")
                    with gr.Row():
                        run = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop = gr.Button("Stop")
                        compare = gr.Button("Compare methods", elem_id="compare")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Images", columns=2, height=360, elem_id="gallery")
                    masks = gr.Gallery(label="CLoRA masks", columns=3, height=160)
                    info = gr.Markdown()
                    with gr.Row():
                        to_img2img = gr.Checkbox(label="Clicking an image sends it to img2img (else: to the form)",
                                                 elem_id="send-to-img2img")
                        png_file = gr.File(label="Read a PNG's parameters (studio or A1111) into the form",
                                           file_types=[".png"], height=80)
                    comparison = gr.Gallery(label="Methods side by side", columns=3, height=300,
                                            elem_id="comparison")
            form = [*rows, prompt, negative, method, switch_interval, cache_interval, clora_words, clora_fill,
                    perp_neg, perp_weight,
                    decor_words, decor_alpha, seed, randomize, steps, guidance, size, batch, sampler, schedule,
                    clip_skip, init, strength, hires_scale, hires_steps, hires_strength, hires_upscaler, mask_blur]
            run.click(studio.generate, [model_box, *form], [gallery, masks, info], concurrency_id="gpu")
            stop.click(lambda: studio.stop_generation.set(), None, None)  # ends the batch after the current image
            compare.click(studio.compare, [model_box, *form], comparison, concurrency_id="gpu")
            triggers.click(triggers_for, [prompt, *[c for i in range(ROWS) for c in rows[4 * i : 4 * i + 2]]],
                           prompt)
            for index, up, down in movers:
                up.click(lambda *v, i=index: move_row(i, -1, *v), rows, rows)
                down.click(lambda *v, i=index: move_row(i, 1, *v), rows, rows)
            named = {"prompt": prompt, "negative": negative, "method": method, "seed": seed, "randomize": randomize,
                     "steps": steps, "guidance": guidance, "size": size, "perp_neg": perp_neg,
                     "perp_neg_weight": perp_weight, "decor_words": decor_words, "decor_alpha": decor_alpha,
                     "switch_interval": switch_interval, "cache_interval": cache_interval,
                     "clora_words": clora_words, "clora_fill": clora_fill, "sampler": sampler, "schedule": schedule,
                     "clip_skip": clip_skip, "init": init, "strength": strength, "hires_scale": hires_scale,
                     "hires_steps": hires_steps, "hires_strength": hires_strength, "hires_upscaler": hires_upscaler,
                     "mask_blur": mask_blur}
            restored = [*rows, *(named[name] for name in RECIPE_FIELDS)]
            img2img_at = [4 * ROWS + RECIPE_FIELDS.index("init"), 4 * ROWS + RECIPE_FIELDS.index("strength")]

            def on_select(send: bool, gallery_value: Any, event: gr.SelectData):
                if send:
                    editor, value = send_to_img2img(event, gallery_value)
                    updates = [gr.update()] * len(restored)
                    updates[img2img_at[0]], updates[img2img_at[1]] = editor, value
                    return updates
                return recipe_to_form(event, gallery_value)

            gallery.select(on_select, [to_img2img, gallery], restored)
            png_file.upload(png_to_form, png_file, restored)
        with gr.Tab("Train"):
            prompts = default_prompts("tiny" if (model or "").strip().lower() in EMBEDDED_NAMES else "sd", "sks",
                                      "content")
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="Training images (3–20)", file_count="multiple", file_types=["image"],
                                    elem_id="train-files")
                    with gr.Row():
                        image_folder = gr.Textbox(label="…or an image folder on this machine (its .txt captions "
                                                        "load and save below)", elem_id="train-folder", scale=3)
                        load_captions = gr.Button("Load captions", size="sm")
                        save_captions = gr.Button("Save captions", size="sm")
                    captions = gr.Dataframe(headers=["file", "caption"], label="Captions (optional; empty: the "
                                            "instance prompt)", interactive=True, column_count=(2, "fixed"),
                                            elem_id="train-captions")
                    with gr.Row():
                        captioner = gr.Textbox(label="Captioning model folder on this machine (BLIP, GIT, "
                                                     "Florence-2; never downloaded)", scale=3)
                        auto_caption = gr.Button("Caption images", size="sm")
                    style_files = gr.File(label="Style images (Break-for-Make only)", file_count="multiple",
                                          file_types=["image"])
                    train_method = gr.Radio(list(TRAINERS), value="lora", label="Method", elem_id="train-method")
                    kind = gr.Radio(["content", "style"], value="content", label="Kind (not used by Break-for-Make)")
                    trigger = gr.Textbox(label="Trigger word (Break-for-Make: the content's; the style's is this "
                                               "word + \"style\", e.g. sksstyle)", value="sks", elem_id="trigger")
                    instance_prompt = gr.Textbox(label="Instance prompt (caption of images without one; empty: the "
                                                       "base's default shown)", placeholder=prompts.instance,
                                                 elem_id="instance-prompt")
                    with gr.Row():
                        class_prompt = gr.Textbox(label="Class prompt (prior preservation)",
                                                  placeholder=prompts.class_prompt, scale=3)
                        prior = gr.Checkbox(label="Prior preservation", value=False)
                    with gr.Row():
                        resolution = gr.Textbox(label="Resolution (512 or W,H; empty: the base's)", value="")
                        bucket = gr.Checkbox(label="Aspect-ratio buckets", value=False)
                    validation_prompts = gr.Textbox(label="Validation prompts (one a line; empty: the default shown)",
                                                    lines=2, placeholder="\n".join(prompts.validation))
                    with gr.Row():
                        train_steps = gr.Slider(1, 2000, value=100, step=1, label="Steps", elem_id="train-steps")
                        rank = gr.Slider(1, 64, value=4, step=1, label="Rank")
                        learning_rate = gr.Number(label="Learning rate", value=1e-3)
                        threshold = gr.Number(label="SaRA threshold θ", value=2e-3)
                    train_decor = gr.Textbox(label="DECOR during training: remove concepts (comma-separated)")
                    b4m_prior = gr.Radio(["square", "all"], value="square",
                                         label="Break-for-Make orthogonal prior: the paper's square layers, or all "
                                               "layers (better on the embedded model)")
                    with gr.Row():
                        start = gr.Button("Train", variant="primary", elem_id="train")
                        stop_train = gr.Button("Stop")
                with gr.Column():
                    status = gr.Markdown(elem_id="train-status")
                    previews = gr.Gallery(label="Previews", columns=4, height=300)
                    loss_plot = gr.LinePlot(loss_frame([]), x="step", y="loss", label="Loss", height=220,
                                            elem_id="loss-plot")
            files.upload(lambda fs: [[_file_path(f).name, ""] for f in fs or []], files, captions)
            load_captions.click(load_caption_table, image_folder, captions)
            save_captions.click(save_caption_table, [image_folder, captions], status)
            auto_caption.click(auto_captions, [captioner, image_folder, files, trigger], captions,
                               concurrency_id="gpu")
            for event in (model_box.change, kind.change, trigger.blur):
                event(lambda m, t, k: [gr.update(placeholder=text) for text in form_defaults(studio, m, t, k)],
                      [model_box, trigger, kind], [instance_prompt, validation_prompts, class_prompt])
            stop_train.click(lambda: studio.stop_training.set(), None, None)
        with gr.Tab("Library"):
            library = gr.Dataframe(value=library_table(summaries), headers=LIBRARY_COLUMNS, interactive=False,
                                   elem_id="library")
            with gr.Row():
                upload = gr.File(label="Import adapter (.safetensors)", file_types=[".safetensors"])
                selected = gr.Dropdown(choices, value=None, label="Adapter", allow_custom_value=True)
            with gr.Row():
                do_import = gr.Button("Import")
                do_export = gr.Button("Export to kohya (A1111/ComfyUI)")
                do_delete = gr.Button("Delete", variant="stop")
                refresh = gr.Button("Refresh")
            library_info = gr.Markdown()
            exported = gr.File(label="Exported file", interactive=False, height=100)
        # every view of the library, refreshed together after training, import, delete and refresh
        views = [library, *[rows[4 * i + 1] for i in range(ROWS)], selected]
        def train_from_form(*values):
            *head, instance, class_text, prior_on, size, buckets, validation, folder_text = values
            form = TrainForm(instance, class_text, prior_on, size, buckets, validation)
            yield from studio.train(*head, form=form, folder_text=folder_text)

        start.click(train_from_form, [model_box, files, captions, style_files, train_method, kind, trigger,
                                      train_steps, rank, learning_rate, threshold, train_decor, b4m_prior,
                                      instance_prompt, class_prompt, prior, resolution, bucket, validation_prompts,
                                      image_folder],
                    [status, previews, *views, loss_plot], concurrency_id="gpu")
        do_import.click(studio.import_file, [model_box, upload], [library_info, *views])
        do_export.click(studio.export_file, selected, [library_info, exported])
        do_delete.click(studio.delete_file, selected, [library_info, *views])
        refresh.click(library_views, None, views)
    demo.queue(default_concurrency_limit=1)
    return demo


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Adapter Studio web app")
    add_app_flags(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    serve(parse_args(argv))


def serve(args: argparse.Namespace) -> None:
    """Launch the app with parsed flags (``--host --port --share --auth --model``)."""
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("STUDIO_THREADS", "1")))
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    build_app(args.model).launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth)


if __name__ == "__main__":
    main()
