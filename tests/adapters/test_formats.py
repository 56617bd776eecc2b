"""Conformance: every adapter dialect users bring loads with the ΔW its tool's formula gives, changes the image and
composes with every method; SDXL's kohya export round-trips; bad files are refused with nothing attached."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from studio.adapters.file import read_adapter, save_adapter
from studio.adapters.inject import attach_adapter, attached_adapters, detach_adapter, lora_layers
from studio.errors import AdapterError
from tests.adapters import formats
from tests.conftest import make_random_base

SD_FORMATS = {
    "kohya": formats.kohya_lora,
    "locon-tucker": formats.locon,
    "loha": formats.loha,
    "loha-tucker": lambda base, folder, name: formats.loha(base, folder, name, tucker=True),
    "lokr": formats.lokr,
    "lokr-tucker": lambda base, folder, name: formats.lokr(base, folder, name, variant="tucker"),
    "lokr-full": lambda base, folder, name: formats.lokr(base, folder, name, variant="full"),
    "full-diff": formats.full_diff,
    "dora": lambda base, folder, name: formats.kohya_lora(base, folder, name, dora=True),
    "peft": formats.peft_lora,
    "peft-dora": lambda base, folder, name: formats.peft_lora(base, folder, name, dora=True),
    "old-diffusers": formats.old_diffusers,
}
SDXL_FORMATS = {
    "kohya-sdxl": lambda base, folder, name: formats.kohya_lora(base, folder, name, sdxl=True),
    "dora-sdxl": lambda base, folder, name: formats.kohya_lora(base, folder, name, sdxl=True, dora=True),
}
METHODS = ("merge", "switch", "composite", "cmlora", "clora")


@pytest.fixture(scope="module")
def sd_base():
    return make_random_base(family="sd1")


@pytest.fixture(scope="module")
def xl_base():
    return formats.make_sdxl_like_base()


def assert_loaded_delta(base, name, expected):
    """peft's ΔW of every layer (and bias delta) equals the independently computed one, ≤ 1e-5 relative."""
    layers = {(component, path): layer for component, path, layer in lora_layers(base)}
    for key, want in expected.items():
        layer = layers[key[:2]]
        got = layer.lora_B[name].bias * layer.scaling[name] if len(key) == 3 else layer.get_delta_weight(name)
        error = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert error <= 1e-5, f"{key}: relative error {error}"


def image(base, **kwargs):
    options = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    return base.pipe("a sks", generator=torch.Generator().manual_seed(0), **options, **kwargs).images


@pytest.mark.parametrize("label", list(SD_FORMATS) + list(SDXL_FORMATS))
def test_each_dialect_loads_its_exact_delta_and_changes_the_image(label, sd_base, xl_base, tmp_path):
    base, writer = (xl_base, SDXL_FORMATS[label]) if label in SDXL_FORMATS else (sd_base, SD_FORMATS[label])
    path, expected = writer(base, tmp_path, label)
    plain = image(base)
    name = attach_adapter(base, read_adapter(path), label)
    try:
        assert_loaded_delta(base, name, expected)
    finally:
        detach_adapter(base, name)
    with_adapter = image(base, adapters=[(path, 1.0)])
    assert np.abs(with_adapter - plain).mean() > 1e-4


VARIANTS = {"loha-tucker", "lokr-tucker", "lokr-full", "peft-dora"}  # same reading path as a listed format


@pytest.mark.parametrize("label", [f for f in SD_FORMATS if f not in VARIANTS] + list(SDXL_FORMATS))
def test_each_dialect_composes_with_every_method(label, sd_base, xl_base, tmp_path):
    sdxl = label in SDXL_FORMATS
    base, writer = (xl_base, SDXL_FORMATS[label]) if sdxl else (sd_base, SD_FORMATS[label])
    path, _ = writer(base, tmp_path, label)
    other, _ = formats.kohya_lora(base, tmp_path, "other", seed=9, sdxl=sdxl)
    plain = image(base)
    results = {}
    for method in METHODS:
        options = {"capture_resolution": 4 if sdxl else 8} if method == "clora" else None
        results[method] = image(base, adapters=[(path, 1.0), (other, 0.5)], method=method,
                                method_options=options)
        assert np.isfinite(results[method]).all() and np.abs(results[method] - plain).mean() > 1e-4, method
    assert np.abs(results["merge"] - results["composite"]).mean() > 0


@pytest.mark.parametrize("label", ["loha", "full-diff"])
def test_lycoris_with_perp_neg_and_decor(label, sd_base, tmp_path):
    path, _ = SD_FORMATS[label](sd_base, tmp_path, label)
    plain = image(sd_base, adapters=[(path, 1.0)])
    perp = image(sd_base, adapters=[(path, 1.0)], negative_prompt="blurry", perp_neg=True)
    decor = image(sd_base, adapters=[(path, 1.0)], decor_remove=["sks"])
    assert np.abs(perp - plain).mean() > 0 and np.abs(decor - plain).mean() > 0


def test_sdxl_kohya_export_uses_sgm_names_and_round_trips_losslessly(xl_base, tmp_path):
    path, _ = formats.kohya_lora(xl_base, tmp_path, "source", sdxl=True)
    adapter = read_adapter(path)
    exported = save_adapter(adapter, tmp_path / "export.safetensors", layout="kohya", precision="fp32")
    with safe_open(str(exported), "pt") as handle:
        written = set(handle.keys())
    with safe_open(str(path), "pt") as handle:
        original = set(handle.keys())
    assert written == original  # sd-scripts' own names: input_blocks_4_1_…, in_layers_2, te1/te2
    assert any("input_blocks_3_0_op" in k for k in written) and any("middle_block_1" in k for k in written)
    again = read_adapter(exported)
    for component, modules in adapter.modules.items():
        for module_path, module in modules.items():
            other = again.modules[component][module_path]
            assert (module.delta() - other.delta()).abs().max() <= 1e-6 * max(1.0, module.delta().abs().max())
    half = save_adapter(adapter, tmp_path / "half.safetensors", layout="kohya")
    with safe_open(str(half), "pt") as handle:
        key = next(k for k in handle.keys() if k.endswith("lora_down.weight"))
        assert handle.get_tensor(key).dtype == torch.float16  # kohya's default save precision


def test_every_sdxl_module_name_maps_back_through_diffusers(xl_base):
    """The SGM names the export writes are the ones diffusers' converter maps back to the same module."""
    from studio.adapters import keys

    paths = [p for c, p, _ in formats.targets(xl_base, ("unet",))]
    table = formats.sgm_names(xl_base.pipe.unet)
    names = [keys.diffusers_path_to_sgm(p) for p in paths]
    assert names == [formats.to_sgm(p, table).replace(".", "_") for p in paths]
    back = keys.sgm_names_to_diffusers(names)
    assert [keys.kohya_name_to_path(back[n]) for n in names] == paths


def assert_unchanged(base, before_names, before_image):
    assert attached_adapters(base) == before_names
    assert np.array_equal(image(base), before_image)


def test_an_sdxl_lora_on_an_sd_base_is_refused_and_nothing_is_attached(sd_base, xl_base, tmp_path):
    path, _ = formats.kohya_lora(xl_base, tmp_path, "xl-lora", sdxl=True)
    good, _ = formats.kohya_lora(sd_base, tmp_path, "good")
    names, before = attached_adapters(sd_base), image(sd_base)
    with pytest.raises(AdapterError, match="xl-lora.safetensors.*sdxl"):
        image(sd_base, adapters=[(good, 1.0), (path, 1.0)])
    assert_unchanged(sd_base, names, before)


def test_a_file_mixing_dialects_is_refused(sd_base, tmp_path):
    kohya, _ = formats.kohya_lora(sd_base, tmp_path, "k")
    with safe_open(str(kohya), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    mixed = dict(tensors)
    mixed["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"] = torch.zeros(2, 64)
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(AdapterError, match="mixed.safetensors mixes dialects"):
        read_adapter(tmp_path / "mixed.safetensors")
    sgm = dict(tensors)
    sgm["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"] = torch.zeros(2, 64)
    sgm["lora_unet_input_blocks_1_1_proj_in.lora_up.weight"] = torch.zeros(64, 2)
    save_file(sgm, str(tmp_path / "sgm-mixed.safetensors"))
    with pytest.raises(AdapterError, match="sgm-mixed.safetensors mixes dialects"):
        read_adapter(tmp_path / "sgm-mixed.safetensors")


def test_a_module_failing_late_leaves_no_layer_behind(sd_base, tmp_path):
    """A file whose last module does not fit the base: refused before any layer is made."""
    path, _ = formats.kohya_lora(sd_base, tmp_path, "late")
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    last = sorted(k for k in tensors if k.endswith("lora_down.weight"))[-1]
    tensors[last] = torch.zeros(2, 5)
    save_file(tensors, str(tmp_path / "late.safetensors"))
    names, before = attached_adapters(sd_base), image(sd_base)
    with pytest.raises(AdapterError, match="late"):
        image(sd_base, adapters=[(tmp_path / "late.safetensors", 1.0)])
    assert_unchanged(sd_base, names, before)


@pytest.mark.parametrize("label", list(SD_FORMATS) + list(SDXL_FORMATS))
def test_each_dialect_through_generate_by_name_and_by_prompt_tag(label, sd_base, xl_base, tmp_path, monkeypatch):
    """``studio.generate.generate`` (what ``studio generate`` and the app call): ``--adapter NAME:0.8`` and
    ``<lora:NAME:0.8>`` in the prompt give one image, and it differs from the base's."""
    from studio.generate import GenerationRequest, generate

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    (tmp_path / "adapters").mkdir()
    base, writer = (xl_base, SDXL_FORMATS[label]) if label in SDXL_FORMATS else (sd_base, SD_FORMATS[label])
    writer(base, tmp_path / "adapters", label)
    common = dict(seed=1, steps=2, width=32, height=32)
    by_name = generate(base, GenerationRequest("a sks", adapters=[(label, 0.8)], **common))[0]
    by_tag = generate(base, GenerationRequest(f"a sks <lora:{label}:0.8>", **common))[0]
    plain = generate(base, GenerationRequest("a sks", **common))[0]
    named, tagged, untouched = (np.asarray(r.image, dtype=float) for r in (by_name, by_tag, plain))
    assert np.array_equal(named, tagged) and np.abs(named - untouched).mean() > 0
    assert f"<lora:{label}:0.8>" in by_tag.parameters and f"<lora:{label}:0.8>" in by_name.parameters


def test_lycoris_exports_are_exact_or_refused(sd_base, tmp_path):
    """LoKr/LoCon-Tucker factors are a valid kohya LoRA with the same ΔW; LoHa (kernel shape from the base) is
    refused by name."""
    lokr, expected = formats.lokr(sd_base, tmp_path, "lokr")
    exported = save_adapter(read_adapter(lokr), tmp_path / "lokr-as-lora.safetensors", layout="kohya",
                            precision="fp32")
    name = attach_adapter(sd_base, read_adapter(exported), "lokr-as-lora")
    try:
        assert_loaded_delta(sd_base, name, expected)
    finally:
        detach_adapter(sd_base, name)
    loha, _ = formats.loha(sd_base, tmp_path, "loha")
    with pytest.raises(AdapterError, match="loha is a LyCORIS LoHa file"):
        save_adapter(read_adapter(loha), tmp_path / "x.safetensors", layout="kohya")


def test_storing_a_profile_keeps_a_user_file_as_it_was(sd_base, tmp_path):
    from pipelines.frequency import store_profile

    path, _ = formats.loha(sd_base, tmp_path, "loha")
    with safe_open(str(path), "pt") as handle:
        before = {k: handle.get_tensor(k) for k in handle.keys()}
    store_profile(path, {"class": "H", "delta_h": 0.1})
    with safe_open(str(path), "pt") as handle:
        after = {k: handle.get_tensor(k) for k in handle.keys()}
        assert '"class": "H"' in handle.metadata()["studio.freq_profile"]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
