"""Inference: multi-LoRA composition as diffusers pipelines.

``CompositionPipeline`` takes ``method=``; the named classes fix the default method, so
``CMLoRAPipeline.from_pretrained(folder)(prompt, adapters=[…])`` composes with CMLoRA.
"""

from pipelines.composition import CompositionPipeline
from pipelines.composition_xl import CompositionXLPipeline


class MergePipeline(CompositionPipeline):
    default_method = "merge"


class SwitchPipeline(CompositionPipeline):
    default_method = "switch"


class CompositePipeline(CompositionPipeline):
    default_method = "composite"


class CMLoRAPipeline(CompositionPipeline):
    default_method = "cmlora"


class CLoRAPipeline(CompositionPipeline):
    default_method = "clora"


__all__ = ["CLoRAPipeline", "CMLoRAPipeline", "CompositePipeline", "CompositionPipeline", "CompositionXLPipeline",
           "MergePipeline", "SwitchPipeline"]
