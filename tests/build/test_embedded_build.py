"""``studio build-tiny``: the shipped model's recipe, its stages chained, a finished stage skipped."""

import json
from dataclasses import asdict, fields
from pathlib import Path

import frontends.cli
from frontends.build.embedded import Stage, build_stages, embedded_stages
from frontends.build.tiny import DEFAULT_EXPORT, TinyBuildConfig, TinyBuilder
from frontends.cli import main
from tests.build.test_tiny_build import small


def _lineage(record: dict) -> list[dict]:
    """The settings of each stage that made a model, first build first."""
    chain = []
    while record:
        chain.append(record["build_config"] | {"build_step": record["build_step"]})
        record = record.get("fine_tuned_from")
    return chain[::-1]


def test_the_recipe_is_the_shipped_models_lineage():
    shipped = _lineage(json.loads((DEFAULT_EXPORT / "studio_model.json").read_text()))
    recipe = embedded_stages()
    assert len(shipped) == len(recipe)
    for made, stage in zip(shipped, recipe, strict=True):
        settings = json.loads(json.dumps(asdict(stage.config)))
        assert made.pop("build_step") == stage.config.diffusion_steps
        # settings added after a stage was built are at their defaults, which do what that build did
        defaults = {f.name: f.default for f in fields(TinyBuildConfig)}
        assert all(settings[k] == defaults[k] for k in settings.keys() - made.keys())
        # where each fine-tune started is a path on the machine that built it; the recipe fills it in
        assert {k: v for k, v in made.items() if k != "start_from"} == \
               {k: v for k, v in settings.items() if k in made and k != "start_from"}


def _stages() -> list[Stage]:
    guided = small(caption_drop_attribute=0.3, caption_wrong_attribute=0.2, pairs_from_step=0, export_every=2,
                   learning_rate=1e-4, start_from="filled in by the recipe")
    return [Stage("base", small()), Stage("guided", guided)]


def test_stages_chain_and_a_finished_stage_is_skipped(tmp_path, monkeypatch):
    out = tmp_path / "model" / "tiny-sd"
    assert build_stages(_stages(), tmp_path / "work", out) == out
    made = json.loads((out / "studio_model.json").read_text())
    base_export = tmp_path / "work" / "base" / "export" / "tiny-sd"
    assert made["fine_tuned_from"]["model"] == str(base_export.resolve())
    assert made["build_config"]["caption_wrong_attribute"] == 0.2
    assert json.loads((base_export / "studio_model.json").read_text())["build_step"] == 4

    runs = []
    original = TinyBuilder.run

    def counted(self):
        runs.append(Path(self.work_dir).name)
        return original(self)

    monkeypatch.setattr(TinyBuilder, "run", counted)
    build_stages(_stages(), tmp_path / "work", out)
    assert runs == []  # both stages finished: nothing trains again
    (out / "studio_model.json").unlink()  # the last export lost: only that stage runs (and resumes at its end)
    build_stages(_stages(), tmp_path / "work", out)
    assert runs == ["guided"]
    assert json.loads((out / "studio_model.json").read_text())["build_step"] == 4


def test_build_tiny_command_runs_the_recipe_or_the_base_alone(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(frontends.cli, "build_stages",
                        lambda stages, work_root, export_dir: calls.append((stages, work_root, export_dir)) or
                        export_dir)
    assert main(["build-tiny", "--work-dir", str(tmp_path), "--output", str(tmp_path / "m")]) == 0
    assert main(["build-tiny", "--base-only", "--max_train_steps", "7", "--seed", "3"]) == 0
    (whole, work, export), (base, _, default_export) = calls
    assert [s.folder for s in whole] == ["build-tiny", "build-guided", "build-guided-w15"]
    assert whole[0].config.diffusion_steps == 24_000 and work == tmp_path and export == tmp_path / "m"
    assert len(base) == 1 and base[0].config.diffusion_steps == 7 and base[0].config.seed == 3
    assert default_export == DEFAULT_EXPORT
    assert str(tmp_path / "m") in capsys.readouterr().out
