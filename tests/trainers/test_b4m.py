import numpy as np
import pytest
import torch
from PIL import Image

from studio.adapters.file import read_adapter
from studio.data import procedural
from studio.errors import ConfigError, DataError
from tests.conftest import make_random_base
from trainers import TrainConfig, train
from trainers.b4m import (
    RESNET_TARGETS,
    TARGETS,
    B4MBreak,
    B4MConfig,
    FrozenHalf,
    PLPAdapter,
    generated_aux_sets,
    make_basis,
    procedural_aux_sets,
    save_basis,
    train_b4m,
)


@pytest.fixture
def style_images(tmp_path):
    folder = tmp_path / "style"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, shape in enumerate(["circle", "square", "heart", "star"]):
        scene = procedural.jittered_scene(rng, "orange", "zigzag", shape, "gray")
        Image.fromarray(procedural.render(scene)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a orange zwx {shape} on a gray background")
    return folder


def test_basis_is_deterministic_and_orthogonal_on_square_layers():
    unet = make_random_base().pipe.unet
    first, second = make_basis(unet, 8, seed=3), make_basis(unet, 8, seed=3)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    path = next(k for k in first if k.endswith("attn1.to_q.A_frozen")).removesuffix(".A_frozen")
    a_frozen, b_frozen = first[f"{path}.A_frozen"], first[f"{path}.B_frozen"]
    assert b_frozen.abs().sum() > 0  # ΔW ≠ 0 at step 0 on square layers
    joined = torch.cat([a_frozen.T, b_frozen])  # distinct rows of one orthonormal Q (1280 × r)
    assert torch.linalg.eigvalsh(joined.T @ joined).max() <= 1 + 1e-5
    narrow = make_basis(unet, 8, seed=3, prior_rows=0)  # Q drawn with d rows: the rows span all of it
    joined = torch.cat([narrow[f"{path}.A_frozen"].T, narrow[f"{path}.B_frozen"]])
    assert torch.allclose(joined.T @ joined, torch.eye(8), atol=1e-5)
    for basis in (first, narrow):
        cross = next(k for k in basis if k.endswith("attn2.to_k.B_frozen"))
        assert basis[cross].abs().sum() == 0  # non-square: B_f = 0 stays frozen


def test_the_frozen_block_has_the_official_scale_and_spares_to_out():
    """The official code draws Q from 1280 rows for every layer, and gives only square to_q/to_k/to_v the prior:
    on a narrow layer B_f·A_f is then about d/1280 of what a Q with d rows gives."""
    unet = make_random_base().pipe.unet
    official, narrow = make_basis(unet, 4, seed=0), make_basis(unet, 4, seed=0, prior_rows=0)
    path = next(k for k in official if k.endswith("attn1.to_q.A_frozen")).removesuffix(".A_frozen")
    width = official[f"{path}.A_frozen"].shape[1] * 2

    def block(basis):
        return float(torch.linalg.matrix_norm(basis[f"{path}.B_frozen"] @ basis[f"{path}.A_frozen"], ord=2))

    assert block(official) < 4 * width / 1280 * block(narrow)
    out = next(k for k in official if k.endswith("attn1.to_out.0.B_frozen"))
    assert official[out].abs().sum() == 0  # square, but the official code gives to_out.0 no prior


def test_prior_on_all_layers_gives_every_layer_orthonormal_frozen_halves():
    """``prior="all"``: the layers without the paper's square prior (cross-attention keys and values, convolutions)
    get a non-zero frozen B_f and A_f, halves of orthonormal bases of their output and input spaces."""
    unet = make_random_base().pipe.unet
    paper, everywhere = (make_basis(unet, 4, seed=0, targets=TARGETS + RESNET_TARGETS, prior=prior, prior_rows=0)
                         for prior in ("square", "all"))  # Q with d rows: the halves' Gram matrices are O(1)
    for suffix in ("attn2.to_k", "conv1"):
        path = next(k for k in everywhere if k.endswith(f"{suffix}.B_frozen")).removesuffix(".B_frozen")
        assert paper[f"{path}.B_frozen"].abs().sum() == 0
        b_frozen = everywhere[f"{path}.B_frozen"].flatten(1)
        a_frozen = everywhere[f"{path}.A_frozen"].flatten(1)
        for gram in (b_frozen.T @ b_frozen, a_frozen @ a_frozen.T):
            eigenvalues = torch.linalg.eigvalsh(gram)
            assert eigenvalues.max() <= 1 + 1e-5 and eigenvalues.max() > 0.1
    with pytest.raises(ConfigError, match="unknown orthogonal prior"):
        make_basis(unet, 4, seed=0, prior="everywhere")
    square = [k for k in everywhere if k.endswith("attn1.to_q.B_frozen")][-1].removesuffix(".B_frozen")
    joined = torch.cat([everywhere[f"{square}.A_frozen"].T, everywhere[f"{square}.B_frozen"]])
    assert torch.allclose(joined.T @ joined, torch.eye(4), atol=1e-5)  # square layers: the paper's single Q


def test_auxiliary_sets_are_captioned_with_the_other_runs_trigger(tmp_path):
    """METHODS §2.1: the content run's style sets read "… in w@z yarn art style", the style run's content sets
    "a photo of snq teapot": the other run's trigger beside each set's own concept."""
    style_sets = procedural_aux_sets("style", tmp_path, per_set=2, seed=0, trigger="zwx")
    content_sets = procedural_aux_sets("content", tmp_path, per_set=2, seed=0, trigger="sks")
    for sets, pattern in ((style_sets, "zwx {value} "), (content_sets, "sks {value} ")):
        assert len(sets) == 3
        for folder in sets:
            value = folder.name.rsplit("-", 1)[1]
            captions = [p.read_text() for p in sorted(folder.glob("*.txt"))]
            assert len(captions) == 2 and all(pattern.format(value=value) in c for c in captions), captions


def test_generated_auxiliary_sets_for_a_real_base_carry_the_trigger(tmp_path):
    base = make_random_base(family="sd15")
    sets = generated_aux_sets(base, "content", tmp_path, per_set=1, seed=0, trigger="sks")
    assert [p.name for p in sets] == ["aux-content-0", "aux-content-1", "aux-content-2"]
    assert [(folder / "0.txt").read_text() for folder in sets] == [
        "a photo of sks teapot", "a photo of sks vase", "a photo of sks backpack"]
    assert all(Image.open(folder / "0.png").size == (64, 64) for folder in sets)


def test_mcp_isolation_sends_each_loss_to_its_own_half():
    unet = make_random_base().pipe.unet
    plp = PLPAdapter(unet, make_basis(unet, 4, seed=0))
    layer = next(iter(plp.layers.values()))
    with torch.no_grad():
        layer.learnable("B").normal_()
    x = torch.randn(2, layer.base.in_features)
    plp.isolate("A")
    layer(x).sum().backward()
    assert layer.learnable("A").grad is not None and layer.learnable("B").grad is None
    layer.learnable("A").grad = None
    plp.isolate("B")
    layer(x).sum().backward()
    assert layer.learnable("A").grad is None and layer.learnable("B").grad is not None
    plp.remove()
    assert not any(type(m).__name__ == "PLPLayer" for m in unet.modules())


def test_frozen_half_is_not_a_parameter():
    half = FrozenHalf(torch.zeros(2, 3), dim=1)
    assert [n for n, _ in half.named_parameters()] == []


def test_b4m_writes_content_style_and_made_adapters(tmp_path, shape_images, style_images):
    base = make_random_base()
    b4m = B4MConfig(content=shape_images, style=style_images, rank=4, break_steps=2, make_steps=2,
                    aux_images_per_set=2, learning_rate=1e-2, aux_learning_rate=1e-3, make_learning_rate=1e-2)
    config = TrainConfig(output="duo", output_dir=tmp_path / "out", train_batch_size=2, seed=0)
    content_path, style_path, made_path = train_b4m(b4m, config, base=base)
    content, style, made = (read_adapter(p) for p in (content_path, style_path, made_path))
    assert (content.kind, style.kind, made.kind) == ("content", "style", "content+style")
    assert made.trigger_words == ["sks", "zwx"]
    path = next(iter(made.modules["unet"]))
    c, s, m = content.modules["unet"][path], style.modules["unet"][path], made.modules["unet"][path]
    half_in, half_out = c.down.shape[1] // 2, c.up.shape[0] // 2
    # frozen halves identical in all three; the learnable halves come from their own run
    assert torch.equal(c.down[:, :half_in], s.down[:, :half_in]) and torch.equal(c.up[:half_out], s.up[:half_out])
    assert torch.equal(m.down[:, :half_in], c.down[:, :half_in])
    # the content run trained its down half (content lr) and its up half (aux lr): both moved from the basis
    assert not torch.equal(c.down[:, half_in:], s.down[:, half_in:])
    # the base is untouched afterwards
    assert not any(type(mod).__name__ == "PLPLayer" for mod in base.pipe.unet.modules())


def test_make_keeps_the_content_runs_learned_down_half(tmp_path, shape_images, style_images):
    """The official code re-randomises A_l of square layers in the make stage; we keep it (0 make steps)."""
    base = make_random_base()
    b4m = B4MConfig(content=shape_images, style=style_images, rank=4, break_steps=2, make_steps=0,
                    aux_images_per_set=2, learning_rate=1e-2)
    config = TrainConfig(output="keep", output_dir=tmp_path, train_batch_size=2)
    content_path, style_path, made_path = train_b4m(b4m, config, base=base)
    content, style, made = (read_adapter(p) for p in (content_path, style_path, made_path))
    for path, module in made.modules["unet"].items():
        assert torch.equal(module.down, content.modules["unet"][path].down)
        half_out = module.up.shape[0] // 2
        assert torch.equal(module.up[half_out:], style.modules["unet"][path].up[half_out:])


def test_break_steps_the_main_half_before_the_auxiliary_loss(tmp_path, shape_images):
    """As the official code: the main loss is clipped and stepped on its own, and the auxiliary loss is computed
    with the updated main half; it then trains only the other half."""
    base = make_random_base()
    basis = save_basis(make_basis(base.pipe.unet, 4, seed=0), tmp_path / "basis.safetensors", {})
    aux = procedural_aux_sets("style", tmp_path, per_set=2, seed=0, trigger="zwx")
    seen = []

    class Watched(B4MBreak):
        def before_forward(self, ctx, step):
            self.before = {side: [p.detach().clone() for p in self.plp.halves(side)] for side in ("A", "B")}
            super().before_forward(ctx, step)

        def training_loss(self, ctx, step):
            before = self.before
            loss = super().training_loss(ctx, step)
            moved = {side: any(not torch.equal(p, q) for p, q in zip(self.plp.halves(side), before[side]))
                     for side in ("A", "B")}
            grads = torch.autograd.grad(loss, self.plp.halves("A") + self.plp.halves("B"), allow_unused=True,
                                        retain_graph=True)
            reached = {"A": any(g is not None for g in grads[: len(before["A"])]),
                       "B": any(g is not None for g in grads[len(before["A"]) :])}
            seen.append((moved, reached))
            return loss

    config = TrainConfig(images=shape_images, output="watched", output_dir=tmp_path / "out", train_batch_size=2,
                         max_train_steps=2, max_grad_norm=1.0)
    train(config, Watched("content", B4MConfig(learning_rate=1e-2, aux_learning_rate=1e-2), basis, aux),
          base=base)
    assert seen == [({"A": True, "B": False}, {"A": False, "B": True})] * 2


def test_style_run_can_have_its_own_rate(tmp_path):
    from types import SimpleNamespace

    base = make_random_base()
    basis = save_basis(make_basis(base.pipe.unet, 4, seed=0), tmp_path / "basis.safetensors", {})
    config = B4MConfig(learning_rate=1e-3, style_learning_rate=3e-3, aux_learning_rate=1e-4)
    rates = {}
    for main in ("content", "style"):
        run = B4MBreak(main, config, basis, [])
        rates[main] = [group["lr"] for group in run.setup(SimpleNamespace(base=base))]
        run.plp.remove()
    assert rates == {"content": [1e-3, 1e-4], "style": [3e-3, 1e-4]}


def test_b4m_needs_both_folders(tmp_path):
    with pytest.raises(ConfigError, match="--content DIR and --style DIR"):
        train_b4m(B4MConfig(content=tmp_path), TrainConfig(output="x", output_dir=tmp_path),
                  base=make_random_base())


def test_b4m_checks_both_folders_before_it_renders_anything(tmp_path, shape_images):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    for content, style in ((empty, shape_images), (shape_images, empty)):
        with pytest.raises(DataError, match="no images in"):
            train_b4m(B4MConfig(content=content, style=style, break_steps=1, make_steps=0),
                      TrainConfig(output="x", output_dir=out, model=str(tmp_path / "no-model")))
    assert not out.exists()  # no work folder, no rendered auxiliary sets


def test_b4m_on_resnet_convolutions_loads_in_a_plain_diffusers_pipeline(tmp_path, shape_images, style_images):
    """PLP halves on the ResNet convolutions too (A with the conv's kernel, B 1×1); all three files load through
    diffusers' own ``load_lora_weights`` and change the UNet's output."""
    base = make_random_base()
    b4m = B4MConfig(content=shape_images, style=style_images, rank=4, break_steps=2, make_steps=2,
                    aux_images_per_set=2, learning_rate=1e-2, aux_learning_rate=1e-2, make_learning_rate=1e-2,
                    target_modules=TARGETS + RESNET_TARGETS)
    config = TrainConfig(output="conv", output_dir=tmp_path / "out", train_batch_size=2, seed=0)
    paths = train_b4m(b4m, config, base=base)
    content, style, made = (read_adapter(p) for p in paths)
    convs = [p for p, m in made.modules["unet"].items() if m.down.dim() == 4]
    assert convs and all(p.endswith(("conv1", "conv2")) for p in convs)
    path = convs[0]
    half_in, half_out = made.modules["unet"][path].down.shape[1] // 2, made.modules["unet"][path].up.shape[0] // 2
    assert torch.equal(content.modules["unet"][path].down[:, :half_in], style.modules["unet"][path].down[:, :half_in])
    assert torch.equal(content.modules["unet"][path].up[:half_out], made.modules["unet"][path].up[:half_out])
    unet = base.pipe.unet
    x, hidden, t = torch.randn(1, 4, 16, 16), torch.randn(1, 77, unet.config.cross_attention_dim), torch.tensor(500)
    with torch.no_grad():
        before = unet(x, t, hidden).sample
        for index, file in enumerate(paths):
            base.pipe.load_lora_weights(str(file), adapter_name=f"b4m{index}")
            base.pipe.set_adapters([f"b4m{index}"])
            assert (unet(x, t, hidden).sample - before).abs().max() > 1e-6


def test_a_new_run_draws_its_own_basis_and_a_resume_refuses_another(tmp_path, shape_images, style_images):
    base = make_random_base()

    def run(rank: int, **extra):
        b4m = B4MConfig(content=shape_images, style=style_images, rank=rank, break_steps=1, make_steps=0,
                        aux_images_per_set=2)
        config = TrainConfig(output="again", output_dir=tmp_path, train_batch_size=2, **extra)
        return train_b4m(b4m, config, base=base)

    run(4)
    made = run(2)[2]  # same name, other rank: not the first run's basis
    assert {m.rank for m in read_adapter(made).modules["unet"].values()} == {2}
    with pytest.raises(ConfigError, match=r"b4m_rank 2 \(now 4\)"):
        run(4, resume_from_checkpoint="latest")


def test_bad_sizes_and_step_counts_are_refused():
    with pytest.raises(ConfigError, match="rank must be at least 1, not 0; max_train_steps must be at least 0"):
        TrainConfig(rank=0, max_train_steps=-5)
    with pytest.raises(ConfigError, match="break steps ≥ 1"):
        train_b4m(B4MConfig(content=".", style=".", break_steps=0), TrainConfig(output="x"), base=make_random_base())


def test_b4m_runs_on_a_base_that_has_held_other_adapters(tmp_path, shape_images, style_images):
    """The app trains on the base it composes with: peft's wrappers stay on layers an adapter ever touched.
    B4M finds its layers through them, trains beside them, and hands them back unchanged."""
    from studio.adapters.inject import attach_adapter, set_adapter_weights
    from tests.conftest import make_adapter
    from trainers import get_method, train

    base = make_random_base()
    train(TrainConfig(images=shape_images, output="lora", output_dir=tmp_path, max_train_steps=1, rank=2,
                      train_batch_size=2), get_method("lora"), base=base)
    attach_adapter(base, make_adapter(base, seed=2), "kept")  # the composer keeps recent adapters loaded
    set_adapter_weights(base, {"kept": 1.0})
    before = {name: type(module) for name, module in base.pipe.unet.named_modules()}
    b4m = B4MConfig(content=shape_images, style=style_images, rank=4, break_steps=1, make_steps=1,
                    aux_images_per_set=2)
    paths = train_b4m(b4m, TrainConfig(output="after", output_dir=tmp_path, train_batch_size=2), base=base)
    made = read_adapter(paths[2]).modules["unet"]
    assert any(path.endswith("attn1.to_q") for path in made) and not any("base_layer" in path for path in made)
    assert {name: type(module) for name, module in base.pipe.unet.named_modules()} == before
    fresh = train_b4m(b4m, TrainConfig(output="fresh", output_dir=tmp_path, train_batch_size=2),
                      base=make_random_base())
    alone = read_adapter(fresh[2]).modules["unet"]  # the kept adapter took no part in training
    assert all(torch.equal(made[p].up, alone[p].up) and torch.equal(made[p].down, alone[p].down) for p in made)
