"""A corpus of bad inputs across fxpress's surface, one test per case.

Every case must raise a typed FxpressError subclass whose message says what went wrong and where (a
layer, field, argument or path), leave the user's model bit-identical (parameter and buffer hashes,
train/eval flags) and the working folder without new or changed files. A case with a command-line
form must also exit non-zero with exactly one non-empty line on stderr (no traceback), and re-raise
the error with `--debug`. benchmarks/fuzz_artifacts.py counts these cases into
benchmarks/results/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from artifact_fuzz import build_artifacts, example_input, tiny_model
from torch import nn

import fxpress
from fxpress.errors import (
    AllocationError,
    ArtifactError,
    CaptureError,
    FxpressError,
    LoweringError,
    ModelError,
    ModelSourceError,
    PassError,
    RecipeError,
    TrainingError,
)
from fxpress.ir.artifact import MANIFEST, TENSORS

# ---- tiny models, each with the flaw a case needs ----------------------------------------------------------

class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x


class Repeat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.abs().sum()) % 3):  # a loop count read from the data
            x = x + 1
        return x


class WithSubmodule(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.fc, self.gate = nn.Linear(4, 4), inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + t[:, None]


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.mix = nn.LSTM(4, 8, batch_first=True), nn.Conv1d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.rnn(x)[0].transpose(1, 2))


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Denoiser(nn.Module):
    """Called like a diffusers UNet (sample, timestep, encoder_hidden_states), for a QAT run."""

    def __init__(self):
        super().__init__()
        self.conv_in, self.cond = nn.Conv2d(2, 8, 3, padding=1), nn.Linear(4, 8)
        self.conv_out = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states):
        h = self.conv_in(sample) + self.cond(encoder_hidden_states.mean(1))[:, :, None, None]
        return self.conv_out(torch.relu(h))


class Bessel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.bessel_j0(x)  # no ONNX translation


def seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build().eval()
    return make


def with_value(name: str, value: float) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = tiny_model()
        with torch.no_grad():
            dict([*model.named_parameters(), *model.named_buffers()])[name].view(-1)[0] = value
        return model
    return make


# ---- the case record and its context ------------------------------------------------------------------------

@dataclass
class Ctx:
    """What a case works with: its folder, the user's model (if any), the saved artifacts and a compressed model."""

    tmp: Path
    saved: dict[str, Path]
    compressed: Any
    model: nn.Module | None = None

    @property
    def art(self) -> Path:
        return self.tmp / "art"


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    provoke: Callable[[Ctx], Any] | None
    error: type | tuple[type, ...]
    match: str
    cause: type | None = None  # a PassError's cause: the error the pass raised
    model: Callable[[], nn.Module] | None = None
    setup: Callable[[Ctx], None] | None = None
    cli: Callable[[Ctx], list[str]] | None = None  # without provoke: the case is this command line


def x() -> torch.Tensor:
    return example_input()


def compress_case(name: str, kind: str, match: str, error: type = RecipeError, recipe: str = "bitsfusion",
                  model: Callable[[], nn.Module] = tiny_model, inputs: Callable[[], Any] = lambda: (x(),),
                  cause: type | None = None, **overrides: Any) -> Case:
    """A case that compresses `model` on `inputs` with `recipe` and `overrides`."""
    return Case(name, kind, lambda ctx: fxpress.compress(ctx.model, inputs(), recipe, **overrides), error, match,
                cause, model)


def cli_case(name: str, kind: str, argv: Callable[[Ctx], list[str]], error: type | tuple[type, ...], match: str,
             setup: Callable[[Ctx], None] | None = None) -> Case:
    """A case that is a command line (provoked with --debug, which must re-raise the error)."""
    return Case(name, kind, None, error, match, setup=setup, cli=argv)


# ---- artifact damage -------------------------------------------------------------------------------------

def copy_artifact(ctx: Ctx, codec: str = "rans") -> None:
    shutil.copytree(ctx.saved[codec], ctx.art)


def edit_manifest(change: Callable[[dict], Any]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        copy_artifact(ctx)
        manifest = json.loads((ctx.art / MANIFEST).read_text())
        change(manifest)
        (ctx.art / MANIFEST).write_text(json.dumps(manifest))
    return setup


def write_file(name: str, data: bytes) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        copy_artifact(ctx)
        (ctx.art / name).write_bytes(data)
    return setup


def edit_tensors(change: Callable[[bytes], bytes], reseal: bool = False) -> Callable[[Ctx], None]:
    """Change the tensors file; with `reseal`, record its new size and sha256 so only the loader's own checks
    can tell."""
    def setup(ctx: Ctx) -> None:
        copy_artifact(ctx)
        blob = change((ctx.art / TENSORS).read_bytes())
        (ctx.art / TENSORS).write_bytes(blob)
        if reseal:
            manifest = json.loads((ctx.art / MANIFEST).read_text())
            manifest["tensors_file"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
            (ctx.art / MANIFEST).write_text(json.dumps(manifest))
    return setup


def header_edit(name: str, **changes: Any) -> Callable[[bytes], bytes]:
    def change(blob: bytes) -> bytes:
        size = struct.unpack("<Q", blob[:8])[0]
        header = json.loads(blob[8:8 + size])
        header[name].update(changes)
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + blob[8 + size:]
    return change


def flip_last_byte(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 0xFF])


def link_outside(name: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        copy_artifact(ctx)
        elsewhere = ctx.tmp / "elsewhere"
        elsewhere.mkdir()
        shutil.move(ctx.art / name, elsewhere / name)
        os.symlink(elsewhere / name, ctx.art / name)
    return setup


def load_art(model: Any = tiny_model) -> Callable[[Ctx], Any]:
    return lambda ctx: fxpress.load(ctx.art, model=model)


def inspect_art(ctx: Ctx) -> list[str]:
    return ["inspect", str(ctx.art)]


def export_art(ctx: Ctx) -> list[str]:
    return ["export", str(ctx.art), "--to", "onnx", "--out", str(ctx.tmp / "model.onnx")]


def compress_cli(*flags: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["compress", "tiny-unet", *[f.replace("{tmp}", str(ctx.tmp)) for f in flags]]


def write_toml(text: str | bytes, name: str = "recipe.toml") -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        path = ctx.tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def toml_case(name: str, text: str | bytes, match: str) -> Case:
    """A recipe file case: through the API (make_recipe via compress) and through `fxpress compress --recipe`."""
    return Case(name, "toml", lambda ctx: fxpress.compress(ctx.model, (x(),), str(ctx.tmp / "recipe.toml")),
                RecipeError, match, model=tiny_model, setup=write_toml(text),
                cli=compress_cli("--recipe", "{tmp}/recipe.toml", "--out", "{tmp}/out"))


def train_nan_directly(ctx: Ctx) -> None:
    from fxpress.training.distributed import Distributed
    from fxpress.training.loop import train_loop

    optimizer = torch.optim.SGD(ctx.model.parameters(), lr=0.1)
    train_loop(lambda step: ctx.model(torch.ones(2, 4)).sum() * float("nan"), optimizer, 3, Distributed(),
               {"model": ctx.model}, description="a test run")


def qat_diverges(ctx: Ctx) -> None:
    from diffusers import DDPMScheduler

    from fxpress.training.diffusion_data import DiffusionData

    gen = torch.Generator().manual_seed(0)
    data = DiffusionData(torch.randn(8, 2, 4, 4, generator=gen), torch.randn(8, 3, 4, generator=gen),
                         torch.zeros(1, 3, 4), DDPMScheduler(num_train_timesteps=1000))
    example = {"sample": torch.randn(2, 2, 4, 4, generator=gen), "timestep": torch.tensor([500, 500]),
               "encoder_hidden_states": torch.randn(2, 3, 4, generator=gen)}
    fxpress.compress(ctx.model, example, "uniform", keep=(), training_data=data,
                     qat={"stage1_steps": 5, "stage2_steps": 0, "batch": 2, "lr": 1e30, "scale_lr": 1e30})


def export_bessel(ctx: Ctx) -> None:
    from fxpress.backends.onnx import export_onnx

    export_onnx(ctx.model, (torch.randn(2, 4),), ctx.tmp / "bessel.onnx")


NAN = float("nan")
CASES = [
    # capture: what torch.export cannot trace
    compress_case("data_dependent_branch", "capture", r"failed in module 'gate'.*data-dependent", CaptureError,
                  "uniform", seeded(lambda: WithSubmodule(Gate())), lambda: (torch.randn(2, 4),)),
    compress_case("data_dependent_loop", "capture", r"failed in module 'gate'", CaptureError, "uniform",
                  seeded(lambda: WithSubmodule(Repeat())), lambda: (torch.randn(2, 4),)),
    Case("not_a_module", "capture", lambda ctx: fxpress.compress(lambda t: t, (x(),), "uniform"), ModelError,
         r"needs a torch.nn.Module, got function"),
    # inputs: missing or not fitting forward
    compress_case("inputs_missing", "inputs", r"example_inputs is missing", ModelError, inputs=lambda: None),
    compress_case("inputs_not_a_container", "inputs", r"example_inputs must be .* got int", ModelError,
                  inputs=lambda: 3),
    compress_case("inputs_lack_an_argument", "inputs", r"TwoInputs.forward\(x, t\).*missing a required argument: 't'",
                  ModelError, model=seeded(TwoInputs), inputs=lambda: (torch.randn(2, 4),)),
    compress_case("inputs_unexpected_keyword", "inputs", r"unexpected keyword argument 'scale'", ModelError,
                  model=seeded(TwoInputs), inputs=lambda: {"x": torch.randn(2, 4), "t": torch.ones(2), "scale": 2}),
    compress_case("inputs_too_many", "inputs", r"Sequential.forward\(input\).*too many positional", ModelError,
                  inputs=lambda: (x(), x())),
    compress_case("inputs_wrong_shape", "inputs", r"failed in module '0'.*conv2d", CaptureError,
                  inputs=lambda: (torch.randn(2, 5),)),
    compress_case("inputs_wrong_dtype", "inputs", r"failed in module '0'.*long", CaptureError,
                  inputs=lambda: (x().long(),)),
    compress_case("inputs_hold_nan", "inputs", r"example input 'input' of Sequential.forward holds 96 NaN", ModelError,
                  inputs=lambda: (x() * NAN,)),
    compress_case("inputs_on_meta", "inputs", r"example input 'input' .* meta device", ModelError,
                  inputs=lambda: (x().to("meta"),)),
    # model: weights fxpress cannot compress
    compress_case("weight_holds_nan", "model", r"parameter '4.weight' of Sequential holds 1 NaN", ModelError,
                  model=with_value("4.weight", NAN)),
    compress_case("weight_holds_inf", "model", r"parameter '0.bias' of Sequential holds 0 NaN and 1 Inf", ModelError,
                  model=with_value("0.bias", float("inf"))),
    compress_case("buffer_holds_nan", "model", r"buffer '1.running_var' of Sequential holds 1 NaN", ModelError,
                  model=with_value("1.running_var", NAN)),
    compress_case("weights_on_meta", "model", r"parameter '0.weight' .* meta device.*load its weights", ModelError,
                  model=lambda: tiny_model().to("meta")),
    # layers: nothing fxpress can quantize
    compress_case("only_unsupported_layers", "layers", r"no layer can be quantized.*mix: unsupported module Conv1d",
                  PassError, "uniform", seeded(Recurrent), lambda: (torch.randn(2, 5, 4),), RecipeError, keep=()),
    compress_case("reflect_padded_conv", "layers", r"no layer can be quantized.*unsupported conv padding",
                  PassError, "uniform", seeded(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1,
                                                                             padding_mode="reflect"))),
                  lambda: (x(),), RecipeError, keep=()),
    compress_case("every_layer_kept", "layers", r"no layer can be quantized.*0: keep:0", PassError,
                  cause=RecipeError, keep=("0", "4", "6")),
    # recipe: names, fields and values
    compress_case("unknown_recipe", "recipe", r"unknown recipe 'bitsfusion2'", recipe="bitsfusion2"),
    compress_case("unknown_recipe_key", "recipe", r"unknown recipe field\(s\) \['targte_bits'\]", targte_bits=2.0),
    compress_case("width_zero", "recipe", r"widths must be integers in 1\.\.8, got \[0, 2\]", widths=[0, 2]),
    compress_case("width_nine", "recipe", r"widths must be integers in 1\.\.8, got \[2, 9\]", widths=[2, 9]),
    compress_case("widths_not_a_list", "recipe", r"recipe field widths must be a list of integers, got 2", widths=2),
    compress_case("uniform_bits_nine", "recipe", r"bits must be an integer in 1\.\.8, got 9", recipe="uniform", bits=9),
    compress_case("unknown_grid", "recipe", r"grids must be among .* got \['ternary'\]", grids=["ternary"]),
    compress_case("eta_out_of_range", "recipe", r"eta must be in \[0, 1\], got 2", eta=2.0),
    compress_case("unknown_sensitivity", "recipe", r"sensitivity must be .* got 'fast'", sensitivity="fast"),
    compress_case("unknown_codec", "recipe", r"codec must be .* got 'zip'", codec="zip"),
    compress_case("field_of_wrong_type", "recipe", r"recipe field calibration must be an integer, got 'four'",
                  calibration="four"),
    compress_case("target_and_budget", "recipe", r"exactly one of target_bits and budget_bytes", budget_bytes=1000,
                  target_bits=2.0),
    compress_case("unknown_qat_field", "recipe", r"unknown qat field\(s\) \['steps'\]", qat={"steps": 3}),
    compress_case("training_recipe_without_data", "recipe", r"trains .* no training_data was given",
                  qat={"stage1_steps": 1, "stage2_steps": 0}),
    # toml: recipe files
    toml_case("toml_malformed", "recipe = 'bitsfusion'\ntarget_bits = = 2\n",
              r"cannot read recipe .*recipe\.toml.*line 2"),
    Case("toml_missing", "toml", lambda ctx: fxpress.compress(ctx.model, (x(),), str(ctx.tmp / "nowhere.toml")),
         RecipeError, r"cannot read recipe .*nowhere\.toml", model=tiny_model,
         cli=compress_cli("--recipe", "{tmp}/nowhere.toml", "--out", "{tmp}/out")),
    toml_case("toml_unknown_key", "recipe = 'bitsfusion'\ntagret_bits = 2.0\n",
              r"unknown recipe field\(s\) \['tagret_bits'\]"),
    toml_case("toml_wrong_type", "recipe = 'bitsfusion'\nwidths = '1,2'\n",
              r"recipe field widths must be a list of integers, got '1,2'"),
    toml_case("toml_not_utf8", b"recipe = '\xff\xfe'\n", r"cannot read recipe .*recipe\.toml.*utf-8"),
    toml_case("toml_unknown_recipe", "recipe = 'magic'\n", r"unknown recipe 'magic'"),
    # keep: layer names
    compress_case("keep_unknown_layer", "keep", r"keep entry 'fc9' matches no layer", keep=("fc9",)),
    compress_case("keep_glob_matches_nothing", "keep", r"keep entry 'blocks\.\*' matches no layer", keep=("blocks.*",)),
    compress_case("keep_empty_name", "keep", r"keep entries must be non-empty strings", keep=("",)),
    compress_case("keep_a_string", "keep", r"recipe field keep must be a list of strings, got '4'", keep="4"),
    # target: impossible bit targets and byte budgets
    Case("target_below_narrowest", "target", lambda ctx: fxpress.compress(ctx.model, (x(),), target_bits=1.0),
         RecipeError, r"target of 1\.0 bits .* below the lowest possible, 1\.585", model=tiny_model,
         cli=compress_cli("--target-bits", "1.0", "--out", "{tmp}/out")),
    compress_case("target_below_narrowest_of_widths", "target", r"below the lowest possible, 4\.000", widths=[4, 8],
                  target_bits=3.0),
    compress_case("budget_below_kept_layers", "target", r"budget of 100 bytes", PassError, cause=AllocationError,
                  keep=("6",), budget_bytes=100),
    compress_case("budget_negative", "target", r"budget_bytes must be positive, got -5", budget_bytes=-5),
    compress_case("target_not_a_number", "target", r"target_bits must be a number.*'two'", target_bits="two"),
    # prune: budgets and inputs the pruner refuses
    Case("prune_budget_zero", "prune", lambda ctx: fxpress.compress(ctx.model, {"x": torch.randn(2, 8)}, "trilevel",
                                                                    budget=0.0),
         RecipeError, r"pruning budget must be a fraction in \(0, 1\) of the latency, got 0\.0",
         model=seeded(ResidualMLP),
         cli=compress_cli("--recipe", "trilevel", "--budget", "latency=0", "--out", "{tmp}/out")),
    compress_case("prune_budget_whole", "prune", r"pruning budget must be a fraction in \(0, 1\) of the params",
                  recipe="trilevel", model=seeded(ResidualMLP), inputs=lambda: {"x": torch.randn(2, 8)}, cost="params",
                  budget=1.0),
    compress_case("prune_removes_everything", "prune", r"nothing left to prune.*TriLevelPrune", PassError, "trilevel",
                  seeded(ResidualMLP), lambda: {"x": torch.randn(2, 8)}, cost="params", budget=0.01,
                  scorer="magnitude", rounds=1),
    compress_case("prune_unknown_cost", "prune", r"unknown pruning cost 'energy'", recipe="trilevel",
                  model=seeded(ResidualMLP), inputs=lambda: {"x": torch.randn(2, 8)}, cost="energy"),
    compress_case("prune_positional_inputs", "prune", r"keyword arguments.*TriLevelPrune", PassError, "trilevel",
                  cost="params", scorer="magnitude"),
    cli_case("prune_budget_flag_malformed", "prune", compress_cli("--recipe", "trilevel", "--budget", "latency",
                                                                 "--out", "{tmp}/out"),
             RecipeError, r"--budget takes COST=FRACTION .* got 'latency'"),
    # artifact: missing, corrupt, truncated, tampered, of another version, pointing elsewhere
    Case("artifact_folder_missing", "artifact", load_art(), ArtifactError, r"art is not an fxpress artifact: "
         r"manifest\.json is missing", cli=inspect_art),
    Case("manifest_missing", "artifact", load_art(), ArtifactError, r"manifest\.json is missing",
         setup=lambda ctx: (copy_artifact(ctx), (ctx.art / MANIFEST).unlink()), cli=inspect_art),
    Case("manifest_not_json", "artifact", load_art(), ArtifactError, r"art/manifest\.json is corrupt",
         setup=write_file(MANIFEST, b"{not json"), cli=inspect_art),
    Case("manifest_not_an_object", "artifact", load_art(), ArtifactError, r"manifest\.json is not an fxpress manifest",
         setup=write_file(MANIFEST, b"[1, 2]"), cli=inspect_art),
    Case("manifest_future_version", "artifact", load_art(), ArtifactError, r"manifest\.json has format version 3; "
         r"this fxpress reads versions 1, 2", setup=edit_manifest(lambda m: m.update(format_version=3)),
         cli=inspect_art),
    Case("manifest_version_as_text", "artifact", load_art(), ArtifactError, r'format version "2"',
         setup=edit_manifest(lambda m: m.update(format_version="2")), cli=inspect_art),
    Case("tensors_missing", "artifact", load_art(), ArtifactError, r"tensors\.safetensors is missing",
         setup=lambda ctx: (copy_artifact(ctx), (ctx.art / TENSORS).unlink()), cli=export_art),
    Case("tensors_truncated", "artifact", load_art(), ArtifactError, r"tensors\.safetensors is truncated or corrupt",
         setup=edit_tensors(lambda b: b[: len(b) // 2]), cli=export_art),
    Case("tensors_byte_flipped", "artifact", load_art(), ArtifactError, r"tensors\.safetensors fails its sha256 check",
         setup=edit_tensors(flip_last_byte), cli=export_art),
    Case("checksum_missing", "artifact", load_art(), ArtifactError, r"field tensors_file\.sha256 must be a string",
         setup=edit_manifest(lambda m: m["tensors_file"].pop("sha256")), cli=inspect_art),
    Case("header_shape_resealed", "artifact", load_art(), ArtifactError,
         r"tensor '6\.weight' has shape \[16, 4\], the model's '6\.weight' has \[4, 16\]",
         setup=edit_tensors(header_edit("6.weight", shape=[16, 4]), reseal=True)),
    Case("header_dtype_resealed", "artifact", load_art(), ArtifactError,
         r"tensor '1\.num_batches_tracked' is stored as torch\.float64",
         setup=edit_tensors(header_edit("1.num_batches_tracked", dtype="F64"), reseal=True)),
    Case("counts_header_resealed", "artifact", load_art(), ArtifactError, r"low-bit layer '(0|4)'.*(codes|counts)",
         setup=edit_tensors(header_edit("lowbit::4::counts", dtype="U8", shape=[36]), reseal=True)),
    Case("weight_shape_edited", "artifact", load_art(), ArtifactError,
         r"low-bit layer '4' has weight shape \[32, 64\], the model's Linear has \[16, 128\]",
         setup=edit_manifest(lambda m: m["lowbit_layers"]["4"].update(weight_shape=[32, 64]))),
    Case("levels_edited", "artifact", load_art(), ArtifactError, r"low-bit layer '0': symbol counts .* 17 levels",
         setup=edit_manifest(lambda m: m["lowbit_layers"]["0"].update(levels=17))),
    Case("codec_unknown", "artifact", load_art(), ArtifactError, r"lowbit_layers\['4'\]\.codec is 'zstd'",
         setup=edit_manifest(lambda m: m["lowbit_layers"]["4"].update(codec="zstd")), cli=inspect_art),
    Case("layer_path_escapes", "artifact", load_art(), ArtifactError, r"lowbit_layers key is '\.\./4'",
         setup=edit_manifest(lambda m: m["lowbit_layers"].update({"../4": m["lowbit_layers"].pop("4")})),
         cli=inspect_art),
    Case("dtype_record_unknown", "artifact", load_art(), ArtifactError, r"dtypes\['6\.bias'\] is 'nn'",
         setup=edit_manifest(lambda m: m["dtypes"].update({"6.bias": "nn"})), cli=inspect_art),
    Case("tensors_point_outside", "artifact", load_art(), ArtifactError,
         r"art/tensors\.safetensors points outside its artifact folder", setup=link_outside(TENSORS), cli=export_art),
    Case("manifest_points_outside", "artifact", load_art(), ArtifactError,
         r"art/manifest\.json points outside its artifact folder", setup=link_outside(MANIFEST), cli=inspect_art),
    Case("untrusted_class", "artifact", load_art(None), ArtifactError, r"refusing to import 'os:system'",
         setup=edit_manifest(lambda m: m["source"].update(library="diffusers", **{"class": "os:system"})),
         cli=export_art),
    Case("class_not_a_model", "artifact", load_art(None), ArtifactError,
         r"refusing 'diffusers.utils:logging' .* not a ModelMixin class",
         setup=edit_manifest(lambda m: m["source"].update(library="diffusers",
                                                          **{"class": "diffusers.utils:logging"}))),
    Case("plain_model_without_factory", "artifact", load_art(None), ArtifactError,
         r"holds a 'torch\.nn\.modules\.container:Sequential' .* pass model=", setup=copy_artifact, cli=export_art),
    Case("model_of_another_shape", "artifact", lambda ctx: fxpress.load(ctx.art, model=ctx.model), ArtifactError,
         r"tensor '6\.(bias|weight)' has shape \[4(, 16)?\], the model's '6\.\1' has \[5", setup=copy_artifact,
         model=lambda: nn.Sequential(*list(tiny_model())[:6], nn.Linear(16, 5)).eval()),
    Case("factory_returns_no_module", "artifact", load_art(lambda: 3), ModelError,
         r"model= must be an nn\.Module or a factory returning one, got int", setup=copy_artifact),
    # export: what a backend lacks or refuses
    Case("export_op_onnx_lacks", "export", export_bessel, LoweringError,
         r"no translation for op prims\.bessel_j0\.default at node 'bessel_j0' in module '<root>'",
         model=seeded(Bessel)),
    cli_case("export_out_exists", "export", export_art, LoweringError, r"model\.onnx exists; pass --overwrite",
             setup=lambda ctx: (copy_artifact(ctx), (ctx.tmp / "model.onnx").write_bytes(b"mine"))),
    cli_case("export_without_input_record", "export", export_art, LoweringError, r"art records no example inputs",
             setup=edit_manifest(lambda m: m.update(inputs=None))),
    # training: a loss that stops being finite
    Case("qat_loss_diverges", "training", qat_diverges, PassError, r"QAT stage I: loss became nan at step \d+",
         TrainingError, seeded(Denoiser)),
    Case("train_loop_loss_nan", "training", train_nan_directly, TrainingError, r"a test run: loss became nan at step 0",
         model=seeded(lambda: nn.Linear(4, 4))),
    # cli: names and paths the command line refuses
    cli_case("unknown_zoo_model", "cli", lambda ctx: ["compress", "nosuchmodel", "--out", str(ctx.tmp / "out")],
             (RecipeError, ModelSourceError), r"nosuchmodel"),
    cli_case("qat_flag_malformed", "cli", compress_cli("--qat", "three", "--out", "{tmp}/out"), RecipeError,
             r"--qat takes two step counts 'STAGE1,STAGE2', got 'three'"),
    cli_case("out_is_a_file", "cli", compress_cli("--out", "{tmp}/taken"), ArtifactError,
             r"taken exists and is not a directory", setup=lambda ctx: (ctx.tmp / "taken").write_text("mine")),
    cli_case("out_not_empty", "cli", compress_cli("--out", "{tmp}/full"), ArtifactError,
             r"full already exists and is not empty; pass overwrite",
             setup=lambda ctx: ((ctx.tmp / "full").mkdir(), (ctx.tmp / "full" / "notes.txt").write_text("mine"))),
    cli_case("out_not_an_artifact_with_overwrite", "cli", compress_cli("--out", "{tmp}/full", "--overwrite"),
             ArtifactError, r"full is not empty and is not an fxpress artifact",
             setup=lambda ctx: ((ctx.tmp / "full").mkdir(), (ctx.tmp / "full" / "notes.txt").write_text("mine"))),
    Case("save_into_non_empty_folder", "cli", lambda ctx: fxpress.save(ctx.compressed, ctx.tmp / "full"),
         ArtifactError, r"full already exists and is not empty",
         setup=lambda ctx: ((ctx.tmp / "full").mkdir(), (ctx.tmp / "full" / "notes.txt").write_text("mine"))),
]


# ---- the checks every case must pass -----------------------------------------------------------------------

def model_state(model: nn.Module | None) -> tuple:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes) and each module's train flag."""
    if model is None:
        return ()
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        if not tensor.is_meta:
            digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest(), tuple((name, m.training) for name, m in model.named_modules())


def folder_state(folder: Path) -> dict[str, str]:
    """Every file and link below `folder` with the sha256 of its bytes (or where the link points)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = f"link to {os.readlink(path)}"
        elif path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[key] = "folder"
    return state


def check_error(case: Case, exc: BaseException) -> None:
    assert isinstance(exc, case.error) and type(exc) is not FxpressError, f"{type(exc).__name__}: {exc}"
    if case.cause is not None:
        assert isinstance(exc.__cause__, case.cause), f"cause {type(exc.__cause__).__name__}: {exc.__cause__}"
    assert re.search(case.match, str(exc), re.S), f"message does not say what and where: {exc}"


def run_cli(case: Case, ctx: Ctx, capsys) -> None:
    from fxpress.cli import main

    argv = case.cli(ctx)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, f"{argv} exited 0"
    assert len(lines) == 1 and "Traceback" not in err, f"stderr is not one line:\n{err}"
    with pytest.raises(FxpressError) as info:
        main([*argv, "--debug"])
    check_error(case, info.value)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return build_artifacts(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def compressed():
    return fxpress.compress(tiny_model(), (x(),), "uniform", bits=4, keep=())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, saved, compressed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a stray file written to the working folder shows up too
    ctx = Ctx(tmp_path, saved, compressed, case.model() if case.model else None)
    if case.setup:
        case.setup(ctx)
    model_before, files_before = model_state(ctx.model), folder_state(tmp_path)
    if case.provoke is not None:
        with pytest.raises(FxpressError) as info:
            case.provoke(ctx)
        check_error(case, info.value)
    if case.cli is not None:
        run_cli(case, ctx, capsys)
    assert model_state(ctx.model) == model_before, "the user's model changed"
    assert folder_state(tmp_path) == files_before, "files were left behind or changed"


def test_corpus_covers_the_surface():
    kinds = {c.kind for c in CASES}
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    assert {"capture", "inputs", "model", "layers", "recipe", "toml", "keep", "target", "artifact", "export",
            "prune", "training", "cli"} <= kinds


def test_train_mode_model_is_captured_as_an_eval_copy():
    """Not refused: an eval-mode copy is captured, with a warning; the caller's module keeps its mode and weights."""
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 4))
    model.train()
    before = model_state(model)
    example = torch.randn(8, 4)
    with pytest.warns(UserWarning, match=r"Sequential is in train mode .* eval-mode copy"):
        result = fxpress.compress(model, (example,), "uniform", bits=8, keep=())
    assert model_state(model) == before and model.training
    with torch.no_grad():
        out = result.model(example)
        assert torch.equal(out, result.model(example))  # no dropout in what was captured
        reference = model.eval()(example)
    assert float((out - reference).norm() / reference.norm()) < 0.05  # 8-bit weights, no dropout
