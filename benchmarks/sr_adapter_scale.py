"""Diagnostic for issue 21: does SR-CN alone miss the follow line because its samples are unreadable, or
because of the adapter's strength? Trains the baseline and SR-CN adapters (seed 0, the settings of
benchmarks/sr_adapters.py), then samples the same probes at adapter scales 1.0, 0.75 and 0.5 and reports
the sr_adapters metrics plus `neither` (share of samples at neither the reference's nor the requested
position) and `pos_conf` (mean top probability of the classifier's position head).

Run: .venv/bin/python benchmarks/sr_adapter_scale.py [adapter steps] [methods...]   (about 25 min on 2 cores)
"""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("FXPRESS_QUIET", "1")

import sr_adapters as sr  # noqa: E402
import torch  # noqa: E402

from fxpress.frontends.capture import capture  # noqa: E402
from fxpress.passes.rewire.branches import set_branch_scale  # noqa: E402
from fxpress.testbed import identity, shapes  # noqa: E402
from fxpress.testbed.dataset import ImageSet  # noqa: E402
from fxpress.testbed.models import load_testbed  # noqa: E402
from fxpress.testbed.quality import classify  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    cache = Path("/tmp/fxpress_sr_cache")
    cache.mkdir(parents=True, exist_ok=True)
    args = types.SimpleNamespace(adapter_steps=int(sys.argv[1]) if len(sys.argv) > 1 else 1500, lora_steps=150,
                                 batch=32, lr=1e-3, ema=0.995)
    testbed = load_testbed("shapes")
    spec = testbed.spec
    encoder = sr.reference_encoder(testbed, cache / "encoder_1500.safetensors")
    raw = shapes.make_shapes(4000, 31)
    ft = ImageSet(identity.lit(raw.images), raw.factors, raw.captions)
    with torch.no_grad():
        embeds = encoder.features(ft.images)
    sets = {"ft": ft, "ft_captions": raw.captions, "ft_factors": raw.factors, "embeds": embeds,
            "ft_poses": identity.pose_maps(raw)}
    example = {"sample": torch.randn(2, spec.channels, spec.resolution, spec.resolution),
               "timestep": torch.tensor([500, 900]), "encoder_hidden_states": testbed.encode(["a shape"] * 2)}
    graph = capture(testbed.denoiser, (), example)
    control = sr.pretrained_control(testbed, graph, spec.load_split("train"), 400, 32,
                                    cache / "control_400.safetensors")
    probe = sr.probes(testbed, 192, encoder)
    _, real = classify(testbed, spec.load_split("test").images)
    base = sr.sample(testbed, testbed.denoiser, probe, seed=0, embeds=False)

    def confidence(images: torch.Tensor) -> float:
        with torch.no_grad():
            return float(testbed.classifier(images)["position"].softmax(-1).max(-1).values.mean())

    print("base model position confidence", round(confidence(base), 3), flush=True)
    for method in sys.argv[2:] or ["baseline", "SR-CN"]:
        began = time.time()
        trained = sr.train_method(method, 0, graph, testbed, sets, control, args)
        for scale in (1.0, 0.75, 0.5):
            set_branch_scale(trained, "identity", scale)
            images = sr.sample(testbed, trained.module.eval(), probe, seed=0)
            m = sr.measure(testbed, images, base, probe, real)
            m["neither"] = 1 - m["copy"] - m["follow"]
            m["pos_conf"] = confidence(images)
            print(method, args.adapter_steps, "scale", scale, {k: round(v, 3) for k, v in m.items()},
                  f"{time.time() - began:.0f}s", flush=True)


if __name__ == "__main__":
    main()
