"""Model families built by ``tools/make_models.py``, one module per family.

* :mod:`.common`   - checks, reports, ONNX helpers and paths shared by every family.
* :mod:`.torchutil` - deterministic torch setup, training, both torch exporters, torchvision.
* :mod:`.digits`   - the sklearn digits split every trained model uses.
* :mod:`.shipped`  - the original small models in ``models/`` (tiny_dense, cifar_bn, digits_*).
* :mod:`.tight`    - the tightness test set (issue 11): deep and wide MLPs, pooling and BN CNNs.
* :mod:`.zoo`      - real exporter output (issue 12): torchvision nets, residual CNN, activations.
* :mod:`.large`    - AlexNet / VGG benchmark chains built from numpy (no torch).

Importing this package pins torch's CPU kernels to AVX2 (unless the caller set
these variables): torch picks its SIMD kernels by CPU, and float32 training then
differs in the last bits between an AVX2 and an AVX-512 machine. Pinning makes the
trained models in ``models/`` rebuild byte-for-byte on both. It must happen before
torch is imported, so ``tools/make_models.py`` imports this package first.
"""

import os

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
