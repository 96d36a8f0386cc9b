"""Export benchmark: the ONNX model (onnxruntime, CPU provider) against the torch model on CPU,
in the same run, on the same preprocessed images.

    python benchmarks/export.py                                    # resnet18, 224 px, 512-d
    python benchmarks/export.py --backbone resnet50 --images 64

Times: load (torch: ``load_trained_model`` from ``.safetensors``; ONNX: export with
``pipeline.serve.export.export_onnx`` and ``InferenceSession`` creation), and embedding of ``--images``
images in batches of ``--batch`` (best of ``--repeats``, methods interleaved, after one warm-up
batch each). Both use ``--threads`` intra-op threads. Preprocessing is excluded (it is the same
for both).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import onnxruntime as ort
    import torch

    from pipeline.config.schema import DataConfig
    from pipeline.config.schema_train import ModelConfig
    from pipeline.model import build_model, load_trained_model
    from pipeline.serve.export import export_onnx
    from pipeline.weights import save_weights

    torch.set_num_threads(args.threads)
    data_cfg = DataConfig(image_size=args.size, resize_size=args.size)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=args.backbone, embedding_dim=args.dim))
    x = torch.randn(
        args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_weights(model.state_dict(), model.architecture, Path(tmp) / "m.safetensors")
        t = time.perf_counter()
        model = load_trained_model(weights)
        torch_load_s = time.perf_counter() - t
        t = time.perf_counter()
        onnx_file = export_onnx(model, data_cfg, Path(tmp) / "m.onnx")
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        ort_load_s = time.perf_counter() - t

    batches = [x[i : i + args.batch] for i in range(0, args.images, args.batch)]

    def run_torch() -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model(b) for b in batches]).numpy()

    def run_onnx() -> np.ndarray:
        return np.concatenate([session.run(None, {"images": b.numpy()})[0] for b in batches])

    with torch.no_grad():
        model(batches[0])
    session.run(None, {"images": batches[0].numpy()})
    times = {"torch": [], "onnx": []}
    outs = {}
    for _ in range(args.repeats):
        for name, fn in (("torch", run_torch), ("onnx", run_onnx)):
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    diff = float(np.abs(outs["torch"] - outs["onnx"]).max())
    print(
        f"{args.backbone} {args.size} px -> {args.dim}-d, {args.images} images in batches of "
        f"{args.batch}, {args.threads} threads; torch {torch.__version__}, onnxruntime "
        f"{ort.__version__}"
    )
    print(f"| model | load | export | embed (best of {args.repeats}) | images/s |")
    print("|---|---|---|---|---|")
    print(
        f"| torch | {torch_load_s:.2f} s | - | {best['torch']:.2f} s | "
        f"{args.images / best['torch']:.1f} |"
    )
    print(
        f"| onnx | {ort_load_s:.2f} s | {export_s:.1f} s | {best['onnx']:.2f} s | "
        f"{args.images / best['onnx']:.1f} |"
    )
    print(
        f"ONNX / torch images/s: {best['torch'] / best['onnx']:.2f}x; max |onnx - torch| = {diff:.1e}"
    )
    print(f"all embed times (s): { {k: [round(v, 2) for v in vs] for k, vs in times.items()} }")


if __name__ == "__main__":
    main()
