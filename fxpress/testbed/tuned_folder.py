"""A tuned testbed on disk: a diffusers-style pipeline folder, so each part compresses like any model folder.

Layout: `model_index.json` (the components' libraries and classes, plus `_fxpress_testbed`: the testbed
it came from), `text_encoder/` and `unet/` (or `transformer/` for a DiT) as `save_pretrained` writes
them (config.json and safetensors), `classifier.safetensors` (the testbed's judge) and `record.json`
(what made it). `fxpress compress DIR --component text_encoder --target-bits 4` compresses the tuned
encoder; `load_tuned(DIR)` loads the whole testbed back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fxpress.errors import ArtifactError, FxpressError
from fxpress.output import library_progress_bars_off
from fxpress.testbed.models import Testbed, build_testbed

INDEX = "model_index.json"
MARK = "_fxpress_testbed"
DENOISER_FOLDER = {"unet": "unet", "dit": "transformer"}


def is_tuned_folder(path: str | Path) -> bool:
    """Whether `path` is a folder `save_tuned` wrote."""
    index = Path(path) / INDEX
    if not index.is_file():
        return False
    try:
        return MARK in json.loads(index.read_text())
    except (OSError, ValueError):
        return False


def check_tuned_out(directory: str | Path, overwrite: bool = False) -> None:
    """Raise ArtifactError where writing a tuned folder to `directory` would lose data: a file, or a non-empty
    folder without `overwrite` or that is not a tuned folder."""
    target = Path(directory).resolve()
    if not target.exists():
        return
    if not target.is_dir():
        raise ArtifactError(f"{target} exists and is not a folder; choose another --out")
    if any(target.iterdir()):
        if not overwrite:
            raise ArtifactError(f"{target} already exists and is not empty; pass --overwrite to replace it")
        if not is_tuned_folder(target):
            raise ArtifactError(f"{target} is not empty and is not a tuned testbed folder; refusing to replace it "
                                "even with --overwrite")


def save_tuned(testbed: Testbed, directory: str | Path, record: dict[str, Any], overwrite: bool = False,
               extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write `testbed` as a tuned folder (see the module docstring) atomically: a temporary sibling renamed
    into place, so a failure leaves nothing half-written. `extra` files are further {name: tensors}
    written as safetensors (the alignment reward's classifier). Refuses to replace a non-empty folder
    unless `overwrite` and it is a tuned folder itself."""
    target = Path(directory).resolve()
    check_tuned_out(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        denoiser_folder = DENOISER_FOLDER[testbed.spec.denoiser]
        with library_progress_bars_off():
            testbed.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            testbed.denoiser.save_pretrained(tmp / denoiser_folder, safe_serialization=True)
        save_file({k: v.contiguous() for k, v in testbed.classifier.state_dict().items()},
                  str(tmp / "classifier.safetensors"))
        for name, tensors in (extra or {}).items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        index = {"_class_name": "FxpressTestbed", MARK: testbed.spec.name,
                 "text_encoder": ["transformers", type(testbed.text_encoder).__name__],
                 denoiser_folder: ["diffusers", type(testbed.denoiser).__name__]}
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        (tmp / "record.json").write_text(json.dumps(record, indent=1))
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_tuned(directory: str | Path) -> Testbed:
    """Return the testbed a tuned folder holds (eval mode); ArtifactError says what is missing or corrupt."""
    path = Path(directory)
    try:
        index = json.loads((path / INDEX).read_text())
        spec_name = index[MARK]
        testbed = build_testbed(spec_name)
        denoiser_folder = DENOISER_FOLDER[testbed.spec.denoiser]
        testbed.text_encoder.load_state_dict(_weights(path / "text_encoder"))
        testbed.denoiser.load_state_dict(_weights(path / denoiser_folder))
        testbed.classifier.load_state_dict(load_file(str(path / "classifier.safetensors")))
        testbed.record = json.loads((path / "record.json").read_text())
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, FxpressError) as exc:
        raise ArtifactError(f"{path} is not a readable tuned testbed folder: {exc}") from exc
    for module in testbed.parts().values():
        module.eval().requires_grad_(False)
    return testbed


def _weights(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ArtifactError(f"{folder}: expected one safetensors weights file, found {len(files)}")
    return load_file(str(files[0]))

