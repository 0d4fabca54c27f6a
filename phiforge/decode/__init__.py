"""Fast CPU decoding steps for a Phi, beside the native kernels and outside the model.

`phiforge.model.Phi` has one implementation (its modules). Generation and serving hold a `Decoder` and make their
KV-cache calls through it; one-token steps then run a `DecodePlan` (decoder.py says when), which must stay
numerically equal to the modules (tests/test_decode.py):
- linear.py: the kernel per weight dtype and the (fused) linear layers in its layout; int8 QuantLinears fused on
  the native kernel;
- screen.py: greedy decoding's lm_head read through a low-precision copy (ArgmaxScreen), exact argmax;
- plan.py: DecodePlan, a step as one flat loop (the whole layer stack in one native call for int8 and int4 models);
  `DecodePlan.copy_bytes` says what weight copies a plan would make (none for models quantized by serve/quant or
  loaded with `load_checkpoint(..., layout="decode")`: their weights are already in the kernels' layout);
- decoder.py: Decoder (what callers hold) and the per-model reuse of plans; `Decoder.describe()` is the one line
  that says which path and kernels a step runs, or why the model's modules do (`generate --verbose`, `serve`).
"""

from phiforge.decode.decoder import Decoder, plan_of, release
from phiforge.decode.linear import default_kernel, mkldnn_bf16
from phiforge.decode.plan import DecodePlan
from phiforge.decode.screen import ArgmaxScreen

__all__ = ["ArgmaxScreen", "DecodePlan", "Decoder", "default_kernel", "mkldnn_bf16", "plan_of", "release"]
