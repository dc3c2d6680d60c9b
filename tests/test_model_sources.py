"""Users' own models: save_pretrained folders, pipeline components and factories, compressed from the CLI."""

from __future__ import annotations

import json
import string
import sys

import pytest
import torch

import fxpress
from fxpress.cli import main
from fxpress.errors import ModelSourceError
from fxpress.frontends.model_sources import resolve_model
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear

UNET = dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",), block_out_channels=(8,), layers_per_block=1,
            cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16,),
           down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4,
           sample_size=8)
TOKENS = ["<|startoftext|>", "<|endoftext|>", *string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase),
          "ca", "cat</w>"]


def _models() -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    return {
        "unet": UNet2DConditionModel(**UNET),
        "pixart": PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16,
                                           caption_channels=12),
        "sd3": SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                     pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8),
        "vae": AutoencoderKL(**VAE),
        "clip": CLIPTextModel(CLIPTextConfig(vocab_size=len(TOKENS), hidden_size=8, intermediate_size=16,
                                             num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                             bos_token_id=0, eos_token_id=1, pad_token_id=1)),
        "t5": T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)),
    }


def _pipeline(models: dict[str, torch.nn.Module], folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(TOKENS)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    return StableDiffusionPipeline(vae=models["vae"], text_encoder=models["clip"], tokenizer=tokenizer,
                                   unet=models["unet"], scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(root folder, the original models): each model saved with save_pretrained, and a pipeline folder `pipe`."""
    root = tmp_path_factory.mktemp("models")
    models = _models()
    for name, model in models.items():
        model.save_pretrained(root / name)
    (root / "tok").mkdir()
    _pipeline(models, root / "tok").save_pretrained(root / "pipe")
    return root, models


def _lowbit_count(module: torch.nn.Module) -> int:
    return sum(isinstance(m, (LowBitLinear, LowBitConv2d)) for m in module.modules())


EXPECTED = {  # the example inputs derived from each forward signature and config (batch 2)
    "unet": {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 77, 8)},
    "pixart": {"hidden_states": (2, 4, 8, 8), "encoder_hidden_states": (2, 77, 12), "timestep": (2,),
               "added_cond_kwargs": {"resolution": (2, 2), "aspect_ratio": (2, 1)}},
    "sd3": {"hidden_states": (2, 4, 8, 8), "encoder_hidden_states": (2, 77, 12), "pooled_projections": (2, 8),
            "timestep": (2,)},
    "vae": {"sample": (2, 3, 8, 8)},
    "clip": {"input_ids": (2, 77)},
    "t5": {"input_ids": (2, 77)},
}


def _shapes(value):
    return {k: _shapes(v) for k, v in value.items()} if isinstance(value, dict) else tuple(value.shape)


def _output(model, example) -> torch.Tensor:
    out = model(*example.args, **example.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_folder_loads_its_weights_and_compresses(saved, name):
    root, originals = saved
    source = resolve_model(str(root / name))
    model, example = source.build(), source.example_inputs()
    assert not model.training and type(model) is type(originals[name])
    assert source.origin == {"kind": "folder", "path": str(root / name), "resolved": str((root / name).resolve()),
                             "library": "transformers" if name in ("clip", "t5") else "diffusers",
                             "class": type(originals[name]).__name__}
    assert _shapes(example.kwargs) == EXPECTED[name]
    ids = example.kwargs.get("input_ids")
    assert ids is None or int(ids.max()) < originals[name].config.vocab_size
    with torch.no_grad():  # the weights on disk are the original's: same output
        assert torch.equal(_output(model, example), _output(originals[name].eval(), example))
    result = fxpress.compress(model, example, "uniform", bits=4, verify=True)
    assert _lowbit_count(result.model) > 0
    assert result.summary["output_rel_error"] < 0.5  # measured 0.01 (sd3) to 0.27 (vae), default-init weights


def test_cli_compresses_a_unet_folder(saved, monkeypatch):
    root, originals = saved
    monkeypatch.chdir(root)
    assert main(["compress", "./unet", "--recipe", "bitsfusion", "--target-bits", "1.99", "--out", "out"]) == 0
    summary = json.loads((root / "out" / "manifest.json").read_text())["summary"]
    assert summary["origin"] == {"kind": "folder", "path": "./unet", "resolved": str((root / "unet").resolve()),
                                 "library": "diffusers", "class": "UNet2DConditionModel"}
    assert abs(summary["weights_only_bits"] - 1.99) < 0.01
    unet = fxpress.load(root / "out")
    assert type(unet).__name__ == "UNet2DConditionModel" and _lowbit_count(unet) > 0


def test_cli_compresses_a_pipeline_component_and_load_pipeline_runs_it(saved, tmp_path):
    root, _ = saved
    out = tmp_path / "unet-lowbit"
    assert main(["compress", str(root / "pipe"), "--component", "unet", "--recipe", "bitsfusion",
                 "--target-bits", "1.99", "--out", str(out)]) == 0
    origin = json.loads((out / "manifest.json").read_text())["summary"]["origin"]
    assert origin["kind"] == "pipeline-component" and origin["component"] == "unet"
    assert origin["pipeline"] == "StableDiffusionPipeline" and origin["class"] == "UNet2DConditionModel"

    pipe = fxpress.load_pipeline(root / "pipe", unet=out)
    assert _lowbit_count(pipe.unet) > 0 and _lowbit_count(pipe.text_encoder) == 0
    image = pipe("a cat", num_inference_steps=2, height=8, width=8, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 8, 8) and torch.isfinite(image).all()
    with pytest.raises(ModelSourceError, match="has no component 'transformer'"):
        fxpress.load_pipeline(root / "pipe", transformer=out)
    with pytest.raises(ModelSourceError, match="holds a UNet2DConditionModel, but the pipeline's 'text_encoder'"):
        fxpress.load_pipeline(root / "pipe", text_encoder=out)
    with pytest.raises(ModelSourceError, match="no model_index.json"):
        fxpress.load_pipeline(root / "unet", unet=out)


def test_pipeline_components_are_checked(saved, capsys):
    root, _ = saved
    pipe = str(root / "pipe")
    with pytest.raises(ModelSourceError, match=r"name one of its model components \(text_encoder, unet, vae\)"):
        resolve_model(pipe)
    with pytest.raises(ModelSourceError, match="'tokenizer' .* is a CLIPTokenizer, not a model"):
        resolve_model(pipe, "tokenizer")
    with pytest.raises(ModelSourceError, match="'safety_checker' .* is empty"):
        resolve_model(pipe, "safety_checker")
    with pytest.raises(ModelSourceError, match="'prior' .* does not exist"):
        resolve_model(pipe, "prior")
    with pytest.raises(ModelSourceError, match="applies to a pipeline folder"):
        resolve_model(str(root / "unet"), "unet")
    with pytest.raises(ModelSourceError, match="applies to a pipeline folder"):
        resolve_model("tiny-unet", "unet")
    text = resolve_model(pipe, "text_encoder")
    assert text.origin["class"] == "CLIPTextModel" and text.origin["library"] == "transformers"
    assert main(["compress", pipe, "--out", str(root / "never")]) == 2
    assert "name one of its model components" in capsys.readouterr().err and not (root / "never").exists()


@pytest.mark.parametrize("config, match", [
    ({"_class_name": "DDIMScheduler"}, "diffusers has no model class 'DDIMScheduler'"),
    ({"_class_name": "os.system"}, "is not a class name"),
    ({"architectures": ["CLIPTokenizer"]}, "transformers has no model class 'CLIPTokenizer'"),
    ({"hidden_size": 8}, "names no model class"),
])
def test_folder_config_must_name_a_library_model_class(tmp_path, config, match):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match=match):
        resolve_model(str(tmp_path))


def test_folder_errors(saved, tmp_path):
    root, _ = saved
    (tmp_path / "config.json").write_text((root / "unet" / "config.json").read_text())
    with pytest.raises(ModelSourceError, match="no .safetensors weights"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").unlink()
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="fxpress artifact"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelSourceError, match="is a file"):
        resolve_model(str(tmp_path / "manifest.json"))
    with pytest.raises(ModelSourceError, match="unknown zoo model 'sd99'"):
        resolve_model("sd99")


FACTORIES = '''
import torch
from torch import nn

class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.middle, self.last = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, features, gain):
        return self.last(self.middle(self.first(features)).relu()) * gain

def pair():
    return Scale(), (torch.randn(2, 8), torch.tensor(2.0))

def bare():
    return Scale()

def unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**{unet!r})

not_callable = 3
'''


def test_factories(tmp_path, monkeypatch, capsys):
    (tmp_path / "fx_user_models.py").write_text(FACTORIES.replace("{unet!r}", repr(UNET)))
    monkeypatch.chdir(tmp_path)  # the current folder is importable, as for the console script
    monkeypatch.delitem(sys.modules, "fx_user_models", raising=False)
    source = resolve_model("fx_user_models:pair")
    model, example = source.build(), source.example_inputs()
    assert not model.training and example.args[0].shape == (2, 8)
    assert source.origin == {"kind": "factory", "factory": "fx_user_models:pair", "class": "fx_user_models:Scale"}
    with pytest.raises(ModelSourceError, match="'features'.*return \\(model, example_inputs\\)"):
        resolve_model("fx_user_models:bare").example_inputs()
    derived = resolve_model("fx_user_models:unet")
    assert _shapes(derived.example_inputs().kwargs) == EXPECTED["unet"]
    assert len(derived.calibration_inputs(3)) == 3
    with pytest.raises(ModelSourceError, match="not a callable"):
        resolve_model("fx_user_models:not_callable")
    with pytest.raises(ModelSourceError, match="has no 'missing'"):
        resolve_model("fx_user_models:missing")
    with pytest.raises(ModelSourceError, match="cannot import module 'fx_no_such_module'"):
        resolve_model("fx_no_such_module:build")
    assert main(["compress", "fx_user_models:pair", "--recipe", "uniform", "--out", "art"]) == 0
    summary = json.loads((tmp_path / "art" / "manifest.json").read_text())["summary"]
    assert summary["origin"]["kind"] == "factory" and summary["model"] == "fx_user_models:pair"
    assert str(tmp_path) not in sys.path
