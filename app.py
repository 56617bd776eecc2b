"""Adapter Studio web app: layout and thin handlers; all model logic lives in studio/, pipelines/, trainers/."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from studio.generate import GenerationRequest, generate
from studio.models import BaseModel, load_base
from studio.png import save_png

OUTPUTS = Path(os.environ.get("STUDIO_OUTPUTS", "outputs"))


class Studio:
    """Holds the loaded base model between requests; reloads only when the user picks another one."""

    def __init__(self, model: str | None = None) -> None:
        self.model_spec = model
        self._base: BaseModel | None = None

    def base(self, spec: str | None) -> BaseModel:
        spec = spec or None
        if self._base is None or spec != self.model_spec:
            self._base = load_base(spec)
            self.model_spec = spec
        return self._base

    def generate(self, model: str, prompt: str, negative: str, seed: float, steps: float, guidance: float,
                 batch: float, progress: gr.Progress = gr.Progress()) -> list[tuple[str, str]]:  # noqa: B008
        if not prompt.strip():
            raise gr.Error("Write a prompt first.")
        progress(0, desc="loading model")
        base = self.base(model.strip())
        request = GenerationRequest(prompt=prompt, negative_prompt=negative, seed=int(seed), steps=int(steps),
                                    guidance_scale=float(guidance), num_images=int(batch))
        gallery = []
        for result in progress.tqdm(generate(base, request), desc="generating"):
            path = OUTPUTS / f"{result.recipe['seed']:010d}-{len(list(OUTPUTS.glob('*.png'))):05d}.png"
            save_png(result.image, path, result.parameters, result.recipe)
            gallery.append((str(path), result.parameters))
        return gallery


def build_app(model: str | None = None) -> gr.Blocks:
    studio = Studio(model)
    with gr.Blocks(title="Adapter Studio") as demo:
        gr.Markdown("# Adapter Studio")
        with gr.Tab("Compose"):
            with gr.Row():
                with gr.Column():
                    model_box = gr.Textbox(label="Base model (empty = embedded tiny-sd)", value=model or "")
                    prompt = gr.Textbox(label="Prompt", value="a red striped star on a white background")
                    negative = gr.Textbox(label="Negative prompt")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0)
                        steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                        guidance = gr.Slider(0, 20, value=5.0, step=0.5, label="Guidance scale")
                        batch = gr.Slider(1, 16, value=4, step=1, label="Batch count")
                    run = gr.Button("Generate", variant="primary")
                gallery = gr.Gallery(label="Images", columns=4, height=420)
            run.click(studio.generate, [model_box, prompt, negative, seed, steps, guidance, batch], gallery,
                      concurrency_id="gpu")
    demo.queue(default_concurrency_limit=1)
    return demo


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Adapter Studio web app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--auth", default=None, help="user:password")
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("STUDIO_THREADS", "1")))
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    build_app(args.model).launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth)


if __name__ == "__main__":
    main()
