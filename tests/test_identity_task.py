"""The identity-adapter task's parts: further model inputs in training data and sampling, pose maps,
partial captions, angle heads, and adapter + control branch training on them (one and two processes)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from fxpress.frontends import zoo
from fxpress.frontends.capture import capture
from fxpress.passes.context import PassContext
from fxpress.passes.pipeline import Pipeline
from fxpress.passes.rewire.control import AttachControlBranch
from fxpress.passes.rewire.image_adapter import InsertImageAdapter
from fxpress.passes.rewire.strip import StripBranches
from fxpress.passes.rewire.train import AdapterConfig, TrainBranches
from fxpress.testbed import identity, shapes
from fxpress.testbed.classifier import angle_error, angle_to_vector, vector_to_angle
from fxpress.testbed.dataset import ImageSet
from fxpress.testbed.sampling import guided_noise
from fxpress.training.diffusion_data import DiffusionData
from fxpress.training.objectives import noised_batch


def _data(count: int = 12, features: int = 5) -> DiffusionData:
    gen = torch.Generator().manual_seed(0)
    base = DiffusionData(torch.randn(count, 1, 4, 4, generator=gen), torch.randn(count, 3, 8, generator=gen),
                         torch.zeros(1, 3, 8), zoo.get("testbed-digits-unet").training_data().scheduler)
    image = torch.arange(count, dtype=torch.float32)[:, None].expand(count, features)
    return base, DiffusionData(base.samples, base.conditions, base.unconditional, base.scheduler,
                               inputs={"image": image, "map": torch.randn(count, 1, 4, 4, generator=gen)},
                               null_inputs={"image": torch.full((1, features), -1.0)})


def test_further_inputs_follow_their_rows_and_drop_with_the_prompt():
    plain, data = _data()
    a = noised_batch(plain, torch.Generator().manual_seed(3), 64, prompt_dropout=0.3)
    b = noised_batch(data, torch.Generator().manual_seed(3), 64, prompt_dropout=0.3, input_dropout=0.2)
    for field in ("x0", "noise", "t", "cond", "noisy"):  # the further inputs do not change the other draws
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert a.inputs == {}
    rows = [int((data.samples == x).flatten(1).all(1).nonzero()) for x in b.x0]
    dropped_prompt = (b.cond == data.unconditional).flatten(1).all(1)
    dropped_image = (b.inputs["image"] == -1).all(1)
    assert torch.equal(b.inputs["map"], data.inputs["map"][rows])  # no null value: always given
    kept = ~dropped_image
    assert torch.equal(b.inputs["image"][kept], data.inputs["image"][rows][kept])
    assert bool(dropped_image[dropped_prompt].all())  # a dropped prompt drops the image too
    assert int((dropped_image & ~dropped_prompt).sum()) > 0  # and the image also drops on its own
    with pytest.raises(ValueError, match="rows"):
        DiffusionData(data.samples, data.conditions, data.unconditional, data.scheduler,
                      inputs={"image": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match="null_inputs names"):
        DiffusionData(data.samples, data.conditions, data.unconditional, data.scheduler,
                      null_inputs={"image": torch.zeros(1, 5)})


def test_guidance_gives_the_unconditional_rows_the_null_inputs():
    seen = {}

    def model(sample, timestep, encoder_hidden_states, image, pose):
        seen.update(image=image, pose=pose)
        return (sample * 0 + image.sum(1).view(-1, 1, 1, 1) + encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1),)

    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([5, 5])
    cond, uncond = torch.ones(2, 3, 4), torch.zeros(1, 3, 4)
    image, pose = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.randn(2, 1, 2, 2)
    out = guided_noise(model, x, t, cond, uncond, 2.0, inputs={"image": image, "pose": pose},
                       null_inputs={"image": torch.zeros(1, 2)})
    assert torch.equal(seen["image"], torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(seen["pose"], torch.cat([pose, pose]))  # no null value: the same map on both sides
    assert torch.allclose(out[:, 0, 0, 0], 2.0 * (image.sum(1) + 1.0))


def test_pose_maps_hold_the_pose_and_nothing_of_the_identity():
    a = (0, 0, 0, 1, 30.0, (0.6, -0.4))  # small red circle
    b = (3, 2, 1, 1, 30.0, (0.6, -0.4))  # large blue cross, same pose
    c = (3, 2, 1, 2, 60.0, (0.0, 0.0))   # other position and rotation
    images = torch.stack([shapes.render(*f) for f in (a, b, c)])
    factors = {"rotation": torch.tensor([30, 30, 60])}
    centres = identity.centres(images)
    assert torch.allclose(centres[0], torch.tensor([23.5 + 0.6, 8.5 - 0.4]), atol=0.05)
    assert torch.allclose(centres[1], centres[0], atol=0.05)
    maps = identity.pose_maps(ImageSet(images, factors, ["", "", ""]))
    assert maps.shape == (3, 1, 32, 32) and float(maps.min()) == -1.0 and float(maps.max()) > 0.9
    assert float((maps[0] - maps[1]).abs().max()) <= 0.25  # identity (shape, colour, size) is not drawn
    assert float((maps[0] - maps[2]).abs().max()) > 1.5
    lit = identity.lit(images)
    assert float(lit.mean() - images.mean()) > 0.3 and float(lit.max()) <= 1.0
    spot = identity.lit(images, 0.3, "spotlight")  # only the shape is lit: the background keeps its value
    assert torch.equal(spot[:, :, :2, :2], images[:, :, :2, :2]) and float(spot.max()) <= 1.0
    white, spot_white = identity.whiteness(images), identity.whiteness(spot)
    assert float(white.max() - white.min()) < 0.15 < float((spot_white - white).min())  # any colour, paler
    with pytest.raises(ValueError, match="lighting"):
        identity.lit(images, 0.3, "fog")


def test_partial_captions_name_only_the_factors_given():
    assert shapes.describe({"shape": 2, "colour": 0, "size": 1, "position": 0}) == shapes.caption(2, 0, 1, 0)
    assert shapes.describe({"size": 1, "position": 3}) == "a large shape at the bottom right"
    assert identity.training_prompt(0) == "a small shape"
    from fxpress.testbed.specs import SHAPES
    from fxpress.testbed.text import WordTokenizer
    from fxpress.testbed.train import partial_captions

    tokenizer = WordTokenizer(list(SHAPES.words), SHAPES.max_length)
    images = shapes.make_shapes(200, 3)
    keep = torch.rand(200, 4, generator=torch.Generator().manual_seed(0)) >= 0.5
    captions = partial_captions(SHAPES, images.factors, torch.arange(200), keep)
    tokenizer(captions)  # every partial caption is in the vocabulary and fits
    assert sum(c == images.captions[i] for i, c in enumerate(captions)) < 40  # most lose a factor
    assert all(c == images.captions[i] for i, c in enumerate(
        partial_captions(SHAPES, images.factors, torch.arange(200), torch.ones(200, 4, dtype=torch.bool))))


def test_angle_heads_encode_periodic_angles():
    degrees = torch.tensor([0.0, 10.0, 45.0, 89.0, 90.0])
    back = vector_to_angle(angle_to_vector(degrees, 90.0), 90.0)
    assert torch.allclose(angle_error(back, degrees, 90.0), torch.zeros(5), atol=1e-4)
    assert torch.allclose(angle_error(torch.tensor([85.0, 5.0]), torch.tensor([5.0, 80.0]), 90.0),
                          torch.tensor([10.0, 15.0]))


@pytest.fixture(scope="module")
def digits_unet():
    entry = zoo.get("testbed-digits-unet")
    model, example, data = entry.build(), entry.example_inputs(), entry.training_data()
    return capture(copy.deepcopy(model), example.args, example.kwargs), data


def test_a_train_only_control_branch_feeds_pose_while_the_adapter_trains_then_strips(digits_unet):
    graph, data = digits_unet
    count = 64
    images = data.samples[:count]
    features = images.flatten(1) @ torch.randn(images[0].numel(), 16, generator=torch.Generator().manual_seed(1))
    pose = -images  # any map with the sample's size
    inputs = {"image_embeds": features, "pose": pose}
    train_data = DiffusionData(images, data.conditions[:count], data.unconditional, data.scheduler,
                               inputs=inputs, null_inputs={"image_embeds": torch.zeros(1, 16)})
    control = Pipeline([AttachControlBranch(name="pose", input_name="pose", channels=1, embedding_channels=(8,),
                                            role="train_only"),
                        TrainBranches(AdapterConfig(branches=("pose",), steps=2, batch=4))]).run(
        graph, PassContext(training_data=DiffusionData(images, data.conditions[:count], data.unconditional,
                                                       data.scheduler, inputs={"pose": pose})))[0]
    frozen = {k: v.clone() for k, v in control.module.controlnet.state_dict().items()}
    trained, report = Pipeline([InsertImageAdapter(16, tokens=2, name="identity"),
                                TrainBranches(AdapterConfig(branches=("identity",), steps=3, batch=4, lr=1e-2))]).run(
        control, PassContext(training_data=train_data))
    details = report.passes[1].details
    assert details["branches"] == ["identity"] and details["trained_params"] > 0
    inner = trained.module.model.controlnet.state_dict()
    assert all(torch.equal(inner[k], v) for k, v in frozen.items())  # the control branch stayed frozen
    values = [m.to_v_ip.weight for m in trained.module.modules() if hasattr(m, "to_v_ip")]
    assert values and all(float(w.abs().sum()) > 0 for w in values)  # zero-initialised, now trained
    stripped = Pipeline([StripBranches("train_only")]).run(trained)[0]
    assert "pose" not in stripped.input_names and "image_embeds" in stripped.input_names
    assert not any("controlnet" in n for n, _ in stripped.module.named_parameters())


def test_adapter_training_with_inputs_under_torchrun_matches_one_process(tmp_path):
    from torchrun import one_and_two_processes

    one, two = one_and_two_processes(["tests/train_adapter_script.py"], tmp_path, script=True)
    a, b = load_file(str(one / "adapter.safetensors")), load_file(str(two / "adapter.safetensors"))
    assert a.keys() == b.keys() and a
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    norm = sum(float(a[k].double().square().sum()) for k in a)
    info = json.loads((two / "report.json").read_text())
    assert info["world_size"] == 2 and info["moved"] > 0
    print(f"relative L2 distance between the 1- and 2-process adapter parameters {(diff / norm) ** 0.5:.2e}")
    assert (diff / norm) ** 0.5 <= 1e-5
