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
_OLD_DIFFUSERS_KEY = re.compile(r"^(?P<path>.+)\.lora\.(?P<part>down|up)\.weight$")
_KOHYA_KEY = re.compile(
    r"^(?P<prefix>lora_unet_|lora_te[12]?_)(?P<name>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)


def parse_peft_key(key: str) -> tuple[str, str] | None:
    """``unet.x.y.lora_A.weight`` (also ``.lora_A.default.weight`` and ``.lora.down.weight``) → (path, "A"/"B")."""
    match = _PEFT_KEY.match(key)
    if match:
        return match["path"], match["part"][-1]
    match = _OLD_DIFFUSERS_KEY.match(key)
    if match:
        return match["path"], "A" if match["part"] == "down" else "B"
    return None


def parse_kohya_key(key: str) -> tuple[str, str, str] | None:
    """``lora_unet_x_y.lora_down.weight`` → (component, module path, "A"/"B"/"alpha")."""
    match = _KOHYA_KEY.match(key)
    if not match:
        return None
    component = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                 "lora_te2_": "text_encoder_2"}[match["prefix"]]
    part = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}[match["part"]]
    return component, kohya_name_to_path(match["name"]), part
