import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from studio.adapters import keys
from studio.adapters.file import LoraModule, read_adapter, save_adapter, update_metadata
from studio.adapters.inject import attach_adapter, detach_adapter, load_adapter, set_adapter_weights
from studio.errors import AdapterError
from tests.conftest import CONV, K2, TE, Q, make_adapter


def unet_output(base, prompt="a red solid circle on a white background"):
    ids = base.pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = base.pipe.text_encoder(ids)[0]
        return base.pipe.unet(latents, torch.tensor([500]), hidden).sample


def test_kohya_names_round_trip():
    for path in (Q, K2, CONV, "mid_block.attentions.0.proj_in",
                 "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj",
                 "text_model.encoder.layers.11.self_attn.out_proj", "time_embedding.linear_1"):
        assert keys.kohya_name_to_path(keys.path_to_kohya_name(path)) == path


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_save_read_keeps_weights_alpha_and_metadata(tmp_path, random_base, layout):
    adapter = make_adapter(random_base)
    path = save_adapter(adapter, tmp_path / "a.safetensors", layout=layout, precision="fp32")
    back = read_adapter(path)
    for component, modules in adapter.modules.items():
        for module_path, module in modules.items():
            got = back.modules[component][module_path]
            assert torch.equal(got.down, module.down) and torch.equal(got.up, module.up)
            assert got.alpha == module.alpha
    assert back.trigger_words == ["sks"] and back.kind == "content"
    with safe_open(str(path), "pt") as handle:
        names = list(handle.keys())
        meta = handle.metadata()
    if layout == "kohya":
        assert f"lora_unet_{keys.path_to_kohya_name(Q)}.lora_down.weight" in names
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in names
    else:
        assert f"unet.{Q}.lora_A.weight" in names and f"text_encoder.{TE}.lora_B.weight" in names
        config = json.loads(meta["lora_adapter_metadata"])
        assert config["unet.r"] in (2, 3, 4) and config["text_encoder.lora_alpha"] == 2.0


def test_diffusers_kohya_diffusers_round_trip_gives_the_same_output(tmp_path, random_base):
    adapter = make_adapter(random_base)
    first = save_adapter(adapter, tmp_path / "a.safetensors")
    kohya = save_adapter(read_adapter(first), tmp_path / "a_kohya.safetensors", layout="kohya",
                         precision="fp32")
    again = save_adapter(read_adapter(kohya), tmp_path / "a_again.safetensors", layout="diffusers")
    load_adapter(random_base, first, "first")
    out_first = unet_output(random_base)
    detach_adapter(random_base, "first")
    load_adapter(random_base, again, "again")
    out_again = unet_output(random_base)
    assert (out_first - out_again).abs().max() <= 1e-4


def test_a1111_keyed_file_loads_and_changes_the_image(tmp_path, random_base):
    """Keys written by hand the way A1111/kohya files are keyed: lora_unet_…/lora_te_… with .alpha scalars."""
    unet = random_base.pipe.unet
    tensors = {}
    for path in (Q, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"):
        module = unet.get_submodule(path)
        stem = "lora_unet_" + path.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = torch.randn(4, module.in_features) * 0.3
        tensors[f"{stem}.lora_up.weight"] = torch.randn(module.out_features, 4) * 0.3
        tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    file = tmp_path / "a1111.safetensors"
    save_file(tensors, str(file), metadata={"ss_network_dim": "4", "ss_network_alpha": "2"})
    before = unet_output(random_base)
    name = load_adapter(random_base, file)
    after = unet_output(random_base)
    assert (after - before).abs().max() > 1e-3
    set_adapter_weights(random_base, {})
    assert torch.allclose(unet_output(random_base), before, atol=1e-6)
    layer = unet.get_submodule(Q)
    set_adapter_weights(random_base, {name: 1.0})
    assert layer.scaling[name] == pytest.approx(0.5)  # alpha 2 / rank 4


def test_weight_scales_each_layer_delta_linearly(random_base):
    attach_adapter(random_base, make_adapter(random_base), "a")
    layer = random_base.pipe.unet.get_submodule(Q)
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        plain = layer.base_layer(x)
        set_adapter_weights(random_base, {"a": 0.5})
        half = layer(x) - plain
        set_adapter_weights(random_base, {"a": 1.0})
        full = layer(x) - plain
    assert full.abs().max() > 1e-3
    assert torch.allclose(half * 2, full, atol=1e-5)
    module = make_adapter(random_base).modules["unet"][Q]
    assert torch.allclose(full, x @ module.delta().T, atol=1e-5)


def test_adapter_for_another_base_is_refused(tmp_path, random_base):
    adapter = make_adapter(random_base)
    wide = adapter.modules["unet"][K2]
    adapter.modules["unet"][K2] = LoraModule(torch.zeros(2, 768), wide.up, 1.0)
    with pytest.raises(AdapterError, match="cross_attention_dim 768, this base has 96"):
        attach_adapter(random_base, adapter, "wide")
    other = make_adapter(random_base)
    other.metadata["studio.base_family"] = "sdxl"
    with pytest.raises(AdapterError, match="trained for a sdxl base"):
        attach_adapter(random_base, other, "xl")
    other.metadata["ss_output_name"] = "last"
    path = save_adapter(other, tmp_path / "downloaded_v2.safetensors")
    with pytest.raises(AdapterError, match="adapter 'downloaded_v2.safetensors' was trained for"):  # the user's file
        attach_adapter(random_base, read_adapter(path), "xl")


def test_missing_module_and_nan_are_refused(random_base):
    adapter = make_adapter(random_base)
    adapter.modules["unet"]["down_blocks.9.attn.to_q"] = adapter.modules["unet"][Q]
    with pytest.raises(AdapterError, match="no module down_blocks.9"):
        attach_adapter(random_base, adapter, "x")
    adapter = make_adapter(random_base)
    adapter.modules["unet"][Q].up[0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN or Inf"):
        attach_adapter(random_base, adapter, "y")


def test_truncated_and_pickle_files_are_refused(tmp_path, random_base):
    path = save_adapter(make_adapter(random_base), tmp_path / "a.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:300])
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        read_adapter(truncated)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    pickle_file = tmp_path / "evil.ckpt"
    torch.save({"x": Payload()}, pickle_file)
    with pytest.raises(AdapterError, match="never unpickles"):
        read_adapter(pickle_file)
    safe = tmp_path / "plain.pt"
    torch.save(make_adapter(random_base).modules["unet"][Q].down, safe)
    with pytest.raises(AdapterError, match="not a dict of tensors"):
        read_adapter(safe)
    with pytest.raises(AdapterError, match="a pickle, which has no header"):
        update_metadata(safe, {"ss_output_name": "x"})


@pytest.mark.parametrize(("parts", "algorithm"), [(("oft_blocks",), "OFT"), (("a1.weight", "a2.weight"), "GLoRA")])
def test_unsupported_lycoris_algorithms_are_refused_by_name(tmp_path, parts, algorithm):
    path = tmp_path / "odd.safetensors"
    save_file({f"lora_unet_x.{part}": torch.zeros(2, 2) for part in parts}, str(path))
    with pytest.raises(AdapterError, match=f"odd.safetensors.*{algorithm}"):
        read_adapter(path)


def test_an_incomplete_loha_module_names_the_missing_part(tmp_path):
    path = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(path))
    with pytest.raises(AdapterError, match="loha.safetensors: module x lacks its hada_w1_b"):
        read_adapter(path)


def test_cli_inspect_and_convert(tmp_path, random_base, capsys):
    from frontends.cli import main

    path = save_adapter(make_adapter(random_base), tmp_path / "demo.safetensors")
    assert main(["adapters", "inspect", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["trigger_words"] == ["sks"] and shown["rank_min_max"] == [2, 4]
    plot = tmp_path / "ranks.png"
    assert main(["adapters", "inspect", str(path), "--plot", str(plot)]) == 0
    from PIL import Image

    assert Image.open(plot).size[0] >= 480
    capsys.readouterr()
    out = tmp_path / "demo_kohya.safetensors"
    assert main(["adapters", "convert", str(path), "--to", "kohya", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as handle:
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in handle.keys())


def test_attaching_an_adapter_leaves_the_active_ones_active(random_base):
    """Attaching deactivates only the newcomer: re-activating the others would walk every adapter's modules in
    every layer on the next generation (that walk made 20 attached adapters 6% slower per step)."""
    from studio.adapters.inject import attach_adapter, detach_adapter, lora_layers, set_adapter_weights

    attach_adapter(random_base, make_adapter(random_base, seed=1), "keep-a")
    set_adapter_weights(random_base, {"keep-a": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second adapter is no reason for peft's "already found" warning
        attach_adapter(random_base, make_adapter(random_base, seed=2), "keep-b")
    layers = [layer for _, _, layer in lora_layers(random_base) if "keep-a" in layer.lora_A]
    assert layers and all(layer.active_adapters == ["keep-a"] for layer in layers)
    assert all(layer.scaling["keep-a"] == 0.5 * layer.lora_alpha["keep-a"] / layer.r["keep-a"] for layer in layers)
    for name in ("keep-a", "keep-b"):
        detach_adapter(random_base, name)
