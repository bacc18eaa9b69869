"""Causal tests of concept encoding: concept-vector patching and layer-restricted LoRA finetuning."""

from conceptprobe.interventions.patching import (
    CONDITIONS,
    PatchConfig,
    PatchResult,
    ResidualPatch,
    answer_under,
    build_prompts_with_states,
    concept_means,
    patch_vectors,
    patched_generate,
    run_patching,
)

__all__ = [
    "CONDITIONS",
    "PatchConfig",
    "PatchResult",
    "ResidualPatch",
    "answer_under",
    "build_prompts_with_states",
    "concept_means",
    "patch_vectors",
    "patched_generate",
    "run_patching",
]
