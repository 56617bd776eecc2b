"""Adapter files keyed exactly as each tool writes them, on tiny random models, with ΔW by each tool's formula.

Each writer returns (file path, {(component, module path): ΔW}) where ΔW is computed here, independently of the
studio's reader, by the published formula of the tool (kohya ``networks/lora.py``; LyCORIS
``lycoris/modules/{locon,loha,lokr,full}.py``; DoRA as in LyCORIS/ComfyUI's ``weight_decompose``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def make_sdxl_like_base(seed: int = 0):
    """SDXL's UNet structure at toy width: 3 down blocks (the first without attention), 2 layers per block,
    transformer depth ≥ 1 where SDXL has attention, added text-time conditioning and two text encoders."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipelines import CompositionXLPipeline
    from studio.models import BaseModel, fingerprint
    from studio.text import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32, 32), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)
    pipe = CompositionXLPipeline(
        vae=vae, unet=unet, scheduler=EulerDiscreteScheduler(), tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"), text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
    )
    pipe.set_progress_bar_config(disable=True)
    base = BaseModel(pipe=pipe, family="sdxl", source="random-sdxl-like", device=torch.device("cpu"),
                     dtype=torch.float32, domain=None, fingerprint=fingerprint(pipe))
    pipe._studio_base = base
    return base


def sgm_names(unet) -> dict[str, str]:
    """diffusers module prefix → sd-scripts' SDXL (SGM) module prefix, built the way the original UNet lists its
    layers: ``input_blocks`` = [conv_in, (resnet, attention)…, downsampler…], ``middle_block`` = [resnet, attention,
    resnet], ``output_blocks`` = [(resnet, attention, upsampler)…]."""
    names = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}
    index = 1
    for b, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            names[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{index}.0"
            if hasattr(block, "attentions"):
                names[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if block.downsamplers:
            names[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    names.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                  "mid_block.resnets.1": "middle_block.2"})
    index = 0
    for b, block in enumerate(unet.up_blocks):
        for j in range(len(block.resnets)):
            names[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{index}.0"
            if hasattr(block, "attentions"):
                names[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == len(block.resnets) - 1 and block.upsamplers:
                position = 2 if hasattr(block, "attentions") else 1
                names[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{index}.{position}.conv"
            index += 1
    return names


_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}


def to_sgm(path: str, table: dict[str, str]) -> str:
    for prefix in sorted(table, key=len, reverse=True):
        if path == prefix or path.startswith(prefix + "."):
            rest = path[len(prefix) + 1:]
            if ".resnets." in prefix:
                rest = _RESNET_SGM.get(rest, rest)
            return table[prefix] + ("." + rest if rest else "")
    raise KeyError(path)


def targets(base, components=("unet", "text_encoder", "text_encoder_2"), every: int = 1
            ) -> list[tuple[str, str, nn.Module]]:
    """(component, module path, layer) for the Linear/Conv2d layers kohya/LyCORIS adapt (attention, feed-forward,
    resnets, down/up-samplers; the text encoders' attention and MLP)."""
    found = []
    for component in components:
        model = getattr(base.pipe, component, None)
        if model is None:
            continue
        for path, module in model.named_modules():
            if not isinstance(module, nn.Linear | nn.Conv2d) or ".lora_" in path:
                continue
            path = path.removesuffix(".base_layer")  # a layer that holds peft adapters already
            if component == "unet" and not path.startswith(("down_blocks", "mid_block", "up_blocks")):
                continue
            if component != "unet" and ("self_attn" not in path and "mlp" not in path):
                continue
            found.append((component, path, module))
    return found[::every]


def te_name(component: str, path: str, sdxl: bool) -> str:
    prefix = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + ("text_model." + path if not path.startswith("text_model.") else path).replace(".", "_")


def kohya_name(component: str, path: str, sdxl: bool, table: dict | None = None) -> str:
    if component != "unet":
        return te_name(component, path, sdxl)
    return "lora_unet_" + (to_sgm(path, table) if sdxl else path).replace(".", "_")


def _shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels, tuple(module.kernel_size)
    return module.out_features, module.in_features, ()


def write(tensors: dict, folder: Path, name: str, metadata: dict | None = None) -> Path:
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def kohya_lora(base, folder: Path, name: str, sdxl: bool = False, rank: int = 2, dora: bool = False, seed: int = 0):
    """kohya ``networks/lora.py``: lora_down (r, in[, k, k]), lora_up (out, r[, 1, 1]), alpha; ΔW = alpha/r·up@down.
    With ``dora``: LyCORIS/kohya's ``dora_scale`` (1, in[, 1, 1]) and W' = m · (W + ΔW₀) / ‖W + ΔW₀‖ over all axes
    but the input one."""
    g = torch.Generator().manual_seed(seed)
    table = sgm_names(base.pipe.unet) if sdxl else None
    tensors, expected = {}, {}
    for component, path, module in targets(base):
        out, inp, kernel = _shape(module)
        stem = kohya_name(component, path, sdxl, table)
        down = torch.randn(rank, inp, *kernel, generator=g) * 0.3
        up = torch.randn(out, rank, *([1, 1] if kernel else []), generator=g) * 0.3
        alpha = 1.0 + rank * torch.rand(1, generator=g).item()
        tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                        f"{stem}.alpha": torch.tensor(alpha)})
        delta = (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(out, inp, *kernel)
        if dora:
            weight = module.weight.detach()
            combined = weight + delta
            norm = combined.transpose(0, 1).reshape(inp, -1).norm(dim=1)
            scale = norm * (1 + 0.2 * torch.rand(inp, generator=g))
            shaped = (1, inp) + (1,) * len(kernel)
            tensors[f"{stem}.dora_scale"] = scale.reshape(shaped)
            delta = combined * (scale / norm).reshape(shaped) - weight
        expected[(component, path)] = delta
    metadata = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1"}
    return write(tensors, folder, name, metadata), expected


def locon(base, folder: Path, name: str, rank: int = 2, seed: int = 1):
    """LyCORIS LoCon with Tucker: a k×k convolution has lora_down (r, in, 1, 1), lora_mid (r, r, k, k) and lora_up
    (out, r, 1, 1); ΔW = einsum("i j k l, p i, j r -> p r k l", mid, up, down) · alpha / r."""
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for component, path, module in targets(base, ("unet", "text_encoder")):
        out, inp, kernel = _shape(module)
        stem = kohya_name(component, path, False)
        alpha = float(rank) / 2
        if kernel and kernel != (1, 1):
            down = torch.randn(rank, inp, 1, 1, generator=g) * 0.3
            mid = torch.randn(rank, rank, *kernel, generator=g) * 0.3
            up = torch.randn(out, rank, 1, 1, generator=g) * 0.3
            tensors[f"{stem}.lora_mid.weight"] = mid
            delta = torch.einsum("ijkl,pi,jr->prkl", mid, up.flatten(1), down.flatten(1)) * alpha / rank
        else:
            down = torch.randn(rank, inp, *kernel, generator=g) * 0.3
            up = torch.randn(out, rank, *([1, 1] if kernel else []), generator=g) * 0.3
            delta = (up.flatten(1) @ down.flatten(1)).reshape(out, inp, *kernel) * alpha / rank
        tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                        f"{stem}.alpha": torch.tensor(alpha)})
        expected[(component, path)] = delta
    return write(tensors, folder, name, {"ss_network_module": "lycoris.kohya"}), expected


def loha(base, folder: Path, name: str, rank: int = 2, seed: int = 2, tucker: bool = False):
    """LyCORIS LoHa: hada_w1_a (out, r), hada_w1_b (r, in·k·k), hada_w2_a, hada_w2_b;
    ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha / r, reshaped to the layer. With ``tucker`` a k×k convolution has
    hada_t1/t2 (r, r, k, k), hada_w*_a (r, out), hada_w*_b (r, in) and w = einsum("i j k l, j r, i p -> p r k l",
    t, w_b, w_a)."""
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for component, path, module in targets(base, ("unet", "text_encoder")):
        out, inp, kernel = _shape(module)
        stem = kohya_name(component, path, False)
        alpha = 1.0
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        if tucker and kernel and kernel != (1, 1):
            t1, t2 = (torch.randn(rank, rank, *kernel, generator=g) * 0.5 for _ in range(2))
            a1, a2 = (torch.randn(rank, out, generator=g) * 0.5 for _ in range(2))
            b1, b2 = (torch.randn(rank, inp, generator=g) * 0.5 for _ in range(2))
            tensors.update({f"{stem}.hada_t1": t1, f"{stem}.hada_t2": t2, f"{stem}.hada_w1_a": a1,
                            f"{stem}.hada_w2_a": a2, f"{stem}.hada_w1_b": b1, f"{stem}.hada_w2_b": b2})
            w1 = torch.einsum("ijkl,jr,ip->prkl", t1, b1, a1)
            w2 = torch.einsum("ijkl,jr,ip->prkl", t2, b2, a2)
            expected[(component, path)] = w1 * w2 * alpha / rank
            continue
        columns = inp * (kernel[0] * kernel[1] if kernel else 1)
        w = [torch.randn(out, rank, generator=g) * 0.5, torch.randn(rank, columns, generator=g) * 0.5,
             torch.randn(out, rank, generator=g) * 0.5, torch.randn(rank, columns, generator=g) * 0.5]
        for key, value in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), w, strict=True):
            tensors[f"{stem}.{key}"] = value
        expected[(component, path)] = ((w[0] @ w[1]) * (w[2] @ w[3]) * alpha / rank).reshape(out, inp, *kernel)
    return write(tensors, folder, name, {"ss_network_module": "lycoris.kohya"}), expected


def _factor(n: int) -> tuple[int, int]:
    """LyCORIS' factorization(n): the split (m, n/m) with m ≤ n/m closest to √n."""
    m = int(n ** 0.5)
    while n % m:
        m -= 1
    return m, n // m


def lokr(base, folder: Path, name: str, rank: int = 2, seed: int = 3, variant: str = "w1-full"):
    """LyCORIS LoKr with out = a·b, in = c·d; ΔW = kron(w1, w2) · scale (make_kron unsqueezes w1 for a
    convolution). Variants: "w1-full" — lokr_w1 (a, c), lokr_w2_a (b, r), lokr_w2_b (r, d[, k, k]), scale alpha/r;
    "tucker" — lokr_w1_a (a, r), lokr_w1_b (r, c), and for k×k convolutions lokr_t2 (r, r, k, k), lokr_w2_a (r, b),
    lokr_w2_b (r, d), w2 = einsum("i j k l, i p, j r -> p r k l", t2, w2_a, w2_b); "full" — lokr_w1 and lokr_w2
    both full, alpha ignored (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for component, path, module in targets(base, ("unet", "text_encoder")):
        out, inp, kernel = _shape(module)
        (a, b), (c, d) = _factor(out), _factor(inp)
        alpha = 3.0
        stem = kohya_name(component, path, False)
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        if variant == "tucker":
            w1a, w1b = torch.randn(a, rank, generator=g) * 0.5, torch.randn(rank, c, generator=g) * 0.5
            tensors.update({f"{stem}.lokr_w1_a": w1a, f"{stem}.lokr_w1_b": w1b})
            w1 = w1a @ w1b
        else:
            w1 = torch.randn(a, c, generator=g) * 0.5
            tensors[f"{stem}.lokr_w1"] = w1
        if variant == "full":
            w2 = torch.randn(b, d, *kernel, generator=g) * 0.2
            tensors[f"{stem}.lokr_w2"] = w2
            scale = 1.0
        elif variant == "tucker" and kernel and kernel != (1, 1):
            t2 = torch.randn(rank, rank, *kernel, generator=g) * 0.5
            w2a, w2b = torch.randn(rank, b, generator=g) * 0.5, torch.randn(rank, d, generator=g) * 0.5
            tensors.update({f"{stem}.lokr_t2": t2, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b})
            w2 = torch.einsum("ijkl,ip,jr->prkl", t2, w2a, w2b)
            scale = alpha / rank
        else:
            w2a = torch.randn(b, rank, generator=g) * 0.5
            w2b = torch.randn(rank, d, *kernel, generator=g) * 0.5
            tensors.update({f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b})
            w2 = (w2a @ w2b.flatten(1)).reshape(b, d, *kernel)
            scale = alpha / rank
        w1_shaped = w1.reshape(a, c, *([1] * len(kernel)))
        expected[(component, path)] = torch.kron(w1_shaped, w2.contiguous()) * scale
    return write(tensors, folder, name, {"ss_network_module": "lycoris.kohya"}), expected


def full_diff(base, folder: Path, name: str, seed: int = 4):
    """LyCORIS full (``algo=full``): ``diff`` is ΔW itself, ``diff_b`` the bias delta."""
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for component, path, module in targets(base, ("unet", "text_encoder"), every=3):
        stem = kohya_name(component, path, False)
        diff = torch.randn(module.weight.shape, generator=g) * 0.05
        tensors[f"{stem}.diff"] = diff
        if module.bias is not None:
            tensors[f"{stem}.diff_b"] = torch.randn(module.bias.shape, generator=g) * 0.05
            expected[(component, path, "bias")] = tensors[f"{stem}.diff_b"]
        expected[(component, path)] = diff
    return write(tensors, folder, name, {"ss_network_module": "lycoris.kohya"}), expected


def peft_lora(base, folder: Path, name: str, rank: int = 2, seed: int = 5, dora: bool = False):
    """diffusers' ``save_lora_weights`` with peft: ``unet.<path>.lora_A.weight``/``lora_B.weight`` and the
    LoraConfig per component in the ``lora_adapter_metadata`` header (here lora_alpha 1 with an alpha_pattern).
    With ``dora``: peft's ``lora_magnitude_vector`` (out,), W' = m · (W + ΔW₀) / ‖W + ΔW₀‖ with the norm per output
    channel (peft's ``get_weight_norm``)."""
    g = torch.Generator().manual_seed(seed)
    tensors, expected, patterns = {}, {}, {}
    for component, path, module in targets(base, ("unet", "text_encoder")):
        out, inp, kernel = _shape(module)
        down = torch.randn(rank, inp, *kernel, generator=g) * 0.3
        up = torch.randn(out, rank, *([1, 1] if kernel else []), generator=g) * 0.3
        file_path = path if component == "unet" else "text_model." + path.removeprefix("text_model.")
        tensors[f"{component}.{file_path}.lora_A.weight"] = down
        tensors[f"{component}.{file_path}.lora_B.weight"] = up
        alpha = 4.0 if "attn2" in path else 1.0
        if alpha != 1.0:
            patterns.setdefault(component, {})[file_path] = alpha
        delta = (up.flatten(1) @ down.flatten(1)).reshape(out, inp, *kernel) * alpha / rank
        if dora:
            weight = module.weight.detach()
            norm = (weight + delta).reshape(out, -1).norm(dim=1)
            magnitude = norm * (1 + 0.2 * torch.rand(out, generator=g))
            tensors[f"{component}.{file_path}.lora_magnitude_vector"] = magnitude
            shaped = (out,) + (1,) * (weight.dim() - 1)
            delta = (weight + delta) * (magnitude / norm).reshape(shaped) - weight
        expected[(component, path)] = delta
    config = {}
    for component in ("unet", "text_encoder"):
        config.update({f"{component}.r": rank, f"{component}.lora_alpha": 1.0,
                       f"{component}.alpha_pattern": patterns.get(component, {})})
    return write(tensors, folder, name, {"format": "pt", "lora_adapter_metadata": json.dumps(config)}), expected


def old_diffusers(base, folder: Path, name: str, rank: int = 2, seed: int = 6):
    """diffusers < 0.21's attention-processor LoRA: ``unet.<block>.attn1.processor.to_q_lora.down.weight`` (and
    ``to_out_lora`` for ``to_out.0``), the text encoder's ``self_attn.to_q_lora.down.weight`` (for ``q_proj``);
    alpha = rank."""
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for _, path, module in targets(base, ("text_encoder",)):
        parent, _, projection = path.rpartition(".")
        old = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}.get(projection)
        if old is None:
            continue
        down = torch.randn(rank, module.in_features, generator=g) * 0.3
        up = torch.randn(module.out_features, rank, generator=g) * 0.3
        stem = f"text_encoder.text_model.{parent.removeprefix('text_model.')}.{old}_lora"
        tensors.update({f"{stem}.down.weight": down, f"{stem}.up.weight": up})
        expected[("text_encoder", path)] = up @ down
    for _, path, module in targets(base, ("unet",)):
        parent, _, projection = path.rpartition(".")
        if projection == "0" and parent.endswith("to_out"):
            parent, projection = parent.removesuffix(".to_out"), "to_out"
        if not parent.endswith(("attn1", "attn2")) or projection not in ("to_q", "to_k", "to_v", "to_out"):
            continue
        down = torch.randn(rank, module.in_features, generator=g) * 0.3
        up = torch.randn(module.out_features, rank, generator=g) * 0.3
        tensors[f"unet.{parent}.processor.{projection}_lora.down.weight"] = down
        tensors[f"unet.{parent}.processor.{projection}_lora.up.weight"] = up
        expected[("unet", path)] = up @ down
    return write(tensors, folder, name), expected
