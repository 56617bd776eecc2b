import pytest
import torch

from pipelines.decor import (
    REFERENCE_WORDS,
    decor_blocks,
    kept_words,
    orthonormal,
    project_blocks,
    project_out,
    project_prompts,
    unwanted_basis,
)
from pipelines.guidance import cfg, masked_fusion, perp_neg, perpendicular_component, weighted_mean
from studio.errors import ConfigError
from tests.pipelines.conftest import call, run


def test_cfg_and_weighted_mean():
    u, c = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    assert torch.equal(cfg(u, c, 7.5), torch.full_like(c, 7.5))
    assert torch.allclose(weighted_mean([u, c], [1, 3]), torch.full_like(c, 0.75))


def test_perp_neg_keeps_the_part_of_a_negative_along_the_positive():
    generator = torch.Generator().manual_seed(0)
    empty, positive = torch.zeros(2, 4, 8, 8), torch.randn(2, 4, 8, 8, generator=generator)
    parallel = 0.5 * positive  # a negative that only repeats the positive: nothing may be removed
    assert torch.allclose(perp_neg(empty, positive, [parallel], [1.5], 7.0), 7.0 * positive, atol=1e-5)
    orthogonal = perpendicular_component(torch.randn(2, 4, 8, 8, generator=generator), positive)
    guided = perp_neg(empty, positive, [orthogonal], [1.5], 7.0)
    assert torch.allclose(guided, 7.0 * (positive - 1.5 * orthogonal), atol=1e-5)
    dims = (1, 2, 3)
    assert ((perpendicular_component(orthogonal, positive) * positive).sum(dims).abs() < 1e-3).all()


def test_masked_fusion_uses_each_mask():
    a, b = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    left = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    fused = masked_fusion([a, b], [left, 1 - left])
    assert fused[0, :, :, 0].eq(0).all() and fused[0, :, :, 1].eq(1).all()


def test_decor_projection_removes_the_unwanted_directions():
    generator = torch.Generator().manual_seed(0)
    unwanted = [torch.randn(2, 16, generator=generator), torch.randn(1, 16, generator=generator)]
    basis = unwanted_basis(unwanted, rank=3)
    assert basis.shape == (16, 3)
    x = torch.randn(77, 16, generator=generator)
    projected = project_out(x, basis, alpha=1.0)
    assert (projected @ basis).abs().max() < 1e-4
    half = project_out(x, basis, alpha=0.5)
    assert torch.allclose(half, (x + projected) / 2, atol=1e-5)
    assert unwanted_basis(unwanted, rank=1).shape == (16, 1)
    protected = orthonormal(torch.randn(2, 16, generator=generator))
    assert (unwanted_basis(unwanted, protected, energy=1.0).T @ protected).abs().max() < 1e-5


def test_decor_bases_depend_on_the_word_and_spare_bos_on_the_embedded_encoder(tiny_base):
    # A word encoded alone is mostly a component shared by every word: bases built from it overlap ~97%.
    pipe = tiny_base.pipe
    bases = {w: decor_blocks(pipe, [w])[0][2] for w in ("circle", "blue", "star")}

    def overlap(a, b):
        return float((bases[a].T @ bases[b]).square().sum()) / min(bases[a].shape[1], bases[b].shape[1])

    assert overlap("circle", "blue") < 0.1 and overlap("blue", "star") < 0.1
    for word, template, place in (("circle", "a red {} on a white background", 3),
                                  ("blue", "a {} star on a black background", 2)):
        with torch.no_grad():
            hidden = pipe.encode_texts([template.format(word)])[0]
            references = pipe.encode_texts([template.format(r) for r in REFERENCE_WORDS])[0]
        projected = project_blocks(hidden, decor_blocks(pipe, [word]))
        assert torch.equal(projected[:, 0], hidden[:, 0])  # BOS is never touched
        difference = hidden[0, place] - references[:, place].mean(0)  # what the word adds in this prompt
        assert float((difference @ bases[word]).square().sum() / difference.square().sum()) > 0.5
        removed = (hidden - projected)[0]
        others = [i for i in range(1, hidden.shape[1]) if i != place]
        assert float(removed[others].square().sum() / hidden[0, others].square().sum()) < 0.1


def test_decor_spares_the_words_the_prompt_asks_for(tiny_base):
    # "circle" and "star" share a direction on this encoder (both are shapes): removing "circle" from a prompt
    # that asks for a star must not take the star's own direction with it.
    pipe = tiny_base.pipe
    prompt, place = "a red zwx star on a white background", 5
    assert kept_words([prompt, "a (red:1.2) circle"], ["circle"]) == ["a", "red", "zwx", "star", "on", "white",
                                                                    "background"]
    with torch.no_grad():
        hidden = pipe.encode_texts([prompt])[0][0]
        references = pipe.encode_texts([prompt.replace("star", r) for r in REFERENCE_WORDS])[0]
    star = hidden[place] - references[:, place].mean(0)

    def removed(basis):
        return float((star @ basis).square().sum() / star.square().sum())

    alone = decor_blocks(pipe, ["circle"])[0][2]
    spared = decor_blocks(pipe, ["circle"], keep=kept_words([prompt], ["circle"]))[0][2]
    assert removed(alone) > 0.1 and removed(spared) < 0.05
    projected = project_prompts(pipe, hidden[None].repeat(2, 1, 1), [prompt], ["circle"])
    assert torch.allclose(projected, project_blocks(hidden[None], decor_blocks(pipe, ["circle"], keep=kept_words(
        [prompt], ["circle"]))).repeat(2, 1, 1), atol=1e-4)


def test_pipeline_perp_neg_and_decor_change_the_image_and_are_recorded(setup):
    pipe, paths = setup
    plain = run(pipe, adapters=[(paths[0], 1.0)], method="composite", negative_prompt="a striped shape")
    perp = call(pipe, adapters=[(paths[0], 1.0)], method="composite", negative_prompt="a striped shape",
                perp_neg=True)
    assert abs(plain - perp.images).mean() > 1e-4
    assert perp.recipe["perp_neg"] == [["a striped shape", 1.5]]
    assert perp.stats.samples == 6 * 3  # ∅, positive, one negative per step
    decor = call(pipe, adapters=[(paths[0], 1.0)], method="composite", negative_prompt="a striped shape",
                 decor_remove=["red"], decor_alpha=1.0)
    assert abs(plain - decor.images).mean() > 1e-4 and decor.recipe["decor_remove"] == ["red"]
    with pytest.raises(ConfigError, match="no negative prompt"):
        run(pipe, perp_neg=True)


def test_perp_neg_without_adapters_works(setup):
    pipe, _ = setup
    output = call(pipe, perp_neg=[("a striped shape", 1.0), ("a blue shape", 0.5)])
    assert output.images.shape == (1, 64, 64, 3) and output.stats.samples == 6 * 4


def test_decor_projection_identity_and_bad_input():
    generator = torch.Generator().manual_seed(1)
    basis = unwanted_basis([torch.randn(3, 16, generator=generator)], rank=3)
    x = torch.randn(5, 16, generator=generator)
    for alpha in (0.0, 0.3, 1.0):
        assert torch.allclose(project_out(x, basis, alpha) @ basis, (1 - alpha) * (x @ basis), atol=1e-5)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        project_out(x, basis, 1.5)
    with pytest.raises(ConfigError, match="tokenize to nothing"):
        unwanted_basis([torch.zeros(0, 16)])
