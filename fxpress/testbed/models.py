"""Build the testbed models from their specs, and load or save the trained weights (safetensors)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fxpress.errors import ArtifactError
from fxpress.testbed.classifier import FactorClassifier
from fxpress.testbed.specs import TestbedSpec, get_spec
from fxpress.testbed.text import WordTokenizer, text_encoder_config

WEIGHTS = Path(__file__).parent / "weights"


@dataclass
class Testbed:
    """A testbed's tokenizer, text encoder, denoiser (UNet or DiT) and classifier (trained or freshly initialised)."""

    spec: TestbedSpec
    tokenizer: WordTokenizer
    text_encoder: nn.Module
    denoiser: nn.Module
    classifier: FactorClassifier
    record: dict[str, Any]

    __test__ = False

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """Return the text encoder's hidden states (N, max_length, width) for `captions`."""
        return self.text_encoder(self.tokenizer(captions)).last_hidden_state

    def parts(self) -> dict[str, nn.Module]:
        """Return the trainable parts by name."""
        return {"denoiser": self.denoiser, "text_encoder": self.text_encoder, "classifier": self.classifier}


def build_testbed(spec: TestbedSpec | str, seed: int = 0) -> Testbed:
    """Return a freshly initialised testbed (seeded)."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = get_spec(spec) if isinstance(spec, str) else spec
    torch.manual_seed(seed)
    tokenizer = WordTokenizer(list(spec.words), spec.max_length)
    config = text_encoder_config(tokenizer.vocab_size, spec.max_length, spec.text_width)
    text = CLIPTextModel(CLIPTextConfig(**config))
    kinds = {"unet": UNet2DConditionModel, "dit": PixArtTransformer2DModel}
    denoiser = kinds[spec.denoiser](**spec.model)
    classifier = FactorClassifier(spec.channels, spec.resolution, spec.factors, angles=spec.angles)
    return Testbed(spec, tokenizer, text, denoiser, classifier, {})


def weights_dir(name: str) -> Path:
    """Return where the committed weights of testbed `name` live."""
    return WEIGHTS / name


def load_testbed(name: str, directory: str | Path | None = None) -> Testbed:
    """Return testbed `name` with its trained weights (eval mode); raises ArtifactError if absent or corrupt."""
    spec = get_spec(name)
    path = Path(directory) if directory is not None else weights_dir(name)
    testbed = build_testbed(spec)
    try:
        record = json.loads((path / "training.json").read_text())
        for part, module in testbed.parts().items():
            module.load_state_dict(load_file(str(path / f"{part}.safetensors")))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ArtifactError(f"testbed {name!r}: cannot load trained weights from {path}: {exc}; "
                            f"train them with `python -m fxpress.testbed.train {name}`") from exc
    testbed.record = record
    for module in testbed.parts().values():
        module.eval().requires_grad_(False)
    return testbed


def save_testbed(testbed: Testbed, directory: str | Path, record: dict[str, Any]) -> Path:
    """Write the three parts as safetensors plus `training.json` (the record) into `directory`."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for part, module in testbed.parts().items():
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(path / f"{part}.tmp"))
        (path / f"{part}.tmp").replace(path / f"{part}.safetensors")
    (path / "training.json").write_text(json.dumps(record, indent=1))
    return path
