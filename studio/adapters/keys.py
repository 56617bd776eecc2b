"""Module names in the two LoRA file dialects: diffusers/PEFT (dotted paths) and kohya/A1111 (underscored).

A kohya key flattens a module path with underscores (``lora_unet_down_blocks_0_attentions_0_proj_in``), which
loses the dots; the path is recovered by re-joining the identifiers diffusers and transformers use, so no base
model is needed to convert a file. Text-encoder paths keep transformers 4's ``text_model.`` prefix in files (what
every other tool writes) and drop it in memory where transformers 5's CLIP has no such wrapper.
"""

from __future__ import annotations

import re

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
KOHYA_SDXL_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

# Identifiers that contain underscores, longest first so that e.g. "add_k_proj" wins over "k_proj".
_IDENTIFIERS = sorted(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
        "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
        "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
        "add_k_proj", "add_v_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
        "position_embedding", "text_projection", "norm_out", "class_embedding",
    },
    key=len,
    reverse=True,
)


def kohya_name_to_path(name: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` → ``down_blocks.0.…attn1.to_q``."""
    parts: list[str] = []
    rest = name
    while rest:
        for ident in _IDENTIFIERS:
            if rest == ident or rest.startswith(ident + "_"):
                parts.append(ident)
                rest = rest[len(ident) + 1 :]
                break
        else:
            head, _, rest = rest.partition("_")
            parts.append(head)
    return ".".join(parts)


def path_to_kohya_name(path: str) -> str:
    return path.replace(".", "_")


def to_file_path(component: str, path: str) -> str:
    """A module path in the form files use: text-encoder paths start with ``text_model.`` as in transformers 4."""
    if component.startswith("text_encoder") and not path.startswith("text_model."):
        return "text_model." + path
    return path


def module_path_in(model, path: str) -> str | None:
    """The path of ``path``'s module inside ``model`` (transformers 5's CLIPTextModel has no ``text_model.``)."""
    for candidate in (path, path.removeprefix("text_model."), "text_model." + path):
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


_PEFT_KEY = re.compile(r"^(?P<path>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_MAGNITUDE_KEY = re.compile(r"^(?P<path>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
_OLD_DIFFUSERS_KEY = re.compile(r"^(?P<path>.+)\.(?:lora|lora_linear_layer)\.(?P<part>down|up)\.weight$")
_OLD_PROCESSOR_KEY = re.compile(
    r"^(?P<path>.+?)(?:\.processor)?\.(?P<projection>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
_KOHYA_KEY = re.compile(r"^(?P<prefix>lora_unet_|lora_te[12]?_)(?P<name>[^.]+)\.(?P<part>.+)$")
_KOHYA_COMPONENT = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                    "lora_te2_": "text_encoder_2"}
# diffusers' old attention processors named the text encoder's projections like the UNet's
_OLD_TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def parse_peft_key(key: str) -> tuple[str, str] | None:
    """A diffusers/PEFT key → (module path, "A"/"B"/"M"): ``x.lora_A.weight`` (also ``.lora_A.default.weight``),
    DoRA's ``x.lora_magnitude_vector``, old diffusers' ``x.lora.down.weight`` and ``x.lora_linear_layer.up.weight``,
    and the attention processors' ``attn1.processor.to_q_lora.down.weight`` (→ ``attn1.to_q``)."""
    match = _PEFT_KEY.match(key)
    if match:
        return match["path"], match["part"][-1]
    match = _PEFT_MAGNITUDE_KEY.match(key)
    if match:
        return match["path"], "M"
    match = _OLD_PROCESSOR_KEY.match(key)
    if match:
        projection = match["projection"]
        if key.startswith("text_encoder"):
            projection = _OLD_TEXT_PROJECTIONS[projection]
        elif projection == "to_out":
            projection = "to_out.0"
        return f"{match['path']}.{projection}", "A" if match["part"] == "down" else "B"
    match = _OLD_DIFFUSERS_KEY.match(key)
    if match:
        return match["path"], "A" if match["part"] == "down" else "B"
    return None


def parse_kohya_key(key: str) -> tuple[str, str, str] | None:
    """``lora_unet_x_y.lora_down.weight`` → (component, kohya module name, part), any LyCORIS part included."""
    match = _KOHYA_KEY.match(key)
    if not match:
        return None
    return _KOHYA_COMPONENT[match["prefix"]], match["name"], match["part"]


# --- SDXL's original (SGM) UNet names, as kohya sd-scripts writes SDXL files --------------------------------------

SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
SDXL_LAYERS_PER_BLOCK = 2
_SGM_OUTSIDE = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
                "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
                "label_emb_0_2": "add_embedding_linear_2"}
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}


def is_sgm_name(name: str) -> bool:
    """A kohya UNet module name in SDXL's original block layout (``input_blocks_4_1_…``, ``out_2``, …)."""
    return name.startswith(SGM_BLOCKS) or name in _SGM_OUTSIDE


def sgm_names_to_diffusers(names: list[str]) -> dict[str, str]:
    """kohya SDXL UNet module names (SGM layout) → diffusers-layout kohya names.

    The block renumbering (``input_blocks_4_1`` → ``down_blocks_1_attentions_0``) is diffusers' own
    ``_maybe_map_sgm_blocks_to_diffusers`` with SDXL's two layers per block; diffusers has no public mapping of
    the names inside a ResNet block (``in_layers_2``…) and of the modules outside the blocks that returns module
    paths rather than its old attention-processor keys, so those few renames are the table above.
    """
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    inside = {f"lora_unet_{n}": n for n in names if n not in _SGM_OUTSIDE}
    mapped = _maybe_map_sgm_blocks_to_diffusers(
        dict(inside), SimpleNamespace(layers_per_block=SDXL_LAYERS_PER_BLOCK))
    result = {n: _SGM_OUTSIDE[n] for n in names if n in _SGM_OUTSIDE}
    for new_key, old_name in mapped.items():
        name = new_key.removeprefix("lora_unet_")
        name = re.sub(r"^input_blocks_", "down_blocks_", name)
        name = re.sub(r"^middle_block_", "mid_block_", name)
        name = re.sub(r"^output_blocks_", "up_blocks_", name)
        name = re.sub(r"_downsamplers_0_op$", "_downsamplers_0_conv", name)
        for sgm, diffusers in _SGM_RESNET.items():
            name = re.sub(rf"(_resnets_\d+)_{sgm}$", rf"\1_{diffusers}", name)
        result[old_name] = name
    return result


def diffusers_path_to_sgm(path: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> str:
    """A diffusers UNet module path → kohya's SGM module name for SDXL (the inverse of
    :func:`sgm_names_to_diffusers`; sd-scripts writes these names from its own SDXL UNet, diffusers has no
    writer for them)."""
    outside = {v.replace("_linear_", ".linear_"): k for k, v in _SGM_OUTSIDE.items()}
    if path in outside:
        return outside[path]
    per = layers_per_block + 1
    parts = path.split(".")
    resnet = {v: k for k, v in _SGM_RESNET.items()}

    def tail(rest: list[str], in_resnet: bool) -> str:
        joined = "_".join(rest)
        return resnet.get(joined, joined) if in_resnet else joined

    if parts[0] == "down_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return f"input_blocks_{(block + 1) * per}_0_op"
        inner = 0 if kind == "resnets" else 1
        return f"input_blocks_{1 + block * per + index}_{inner}_{tail(rest, kind == 'resnets')}"
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        number = 1 if kind == "attentions" else 2 * index
        return f"middle_block_{number}_{tail(rest, kind == 'resnets')}"
    if parts[0] == "up_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            return f"output_blocks_{block * per + layers_per_block}_2_{'_'.join(rest)}"
        inner = 0 if kind == "resnets" else 1
        return f"output_blocks_{block * per + index}_{inner}_{tail(rest, kind == 'resnets')}"
    return path_to_kohya_name(path)
