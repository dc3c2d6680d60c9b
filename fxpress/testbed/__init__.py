"""fxpress's own small trained models and quality benchmark: digits and captioned shapes (no downloads).

`load_testbed("digits")` returns the committed trained tokenizer, text encoder, UNet and classifier;
`quality.evaluate` measures any UNet-like model on it; `python -m fxpress.testbed.train` retrains.
"""

from fxpress.testbed.models import Testbed, build_testbed, load_testbed
from fxpress.testbed.specs import TESTBEDS, TestbedSpec, get_spec

__all__ = ["TESTBEDS", "Testbed", "TestbedSpec", "build_testbed", "get_spec", "load_testbed"]
