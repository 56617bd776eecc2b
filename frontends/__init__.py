"""Front doors: the `studio` CLI, generation with recipes, method comparison and the build scripts of the shipped
model, evaluator and demo adapters. They sit on top of `studio` (core), `pipelines` and `trainers`."""
