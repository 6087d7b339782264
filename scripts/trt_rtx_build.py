"""Device check for the TensorRT path: export graphs and build engines with whatever TensorRT is importable
(TensorRT-RTX 1.7 on our H200: it builds, it cannot run there). Writes build.json and the log under --out.

    PYTHONPATH=.:/tmp/rtx python scripts/trt_rtx_build.py --out $OUT
"""

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import aim_rt
from aim_rt.cli import default_model_path
from aim_rt.config import VQConfig
from aim_rt.engines.builder import build_engines
from aim_rt.engines.trt import find_tensorrt
from aim_rt.exporters.onnx_export import export_onnx
from aim_rt.vq import VQModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/aim_trt"))
    args = ap.parse_args()
    trt = find_tensorrt()
    report = {"tensorrt": None if trt is None else {"flavour": trt.flavour, "version": trt.version},
              "date": time.strftime("%Y-%m-%d"), "builds": {}}
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(str(msg))

    digits = aim_rt.loading.load(default_model_path())  # the model carries no checkpoint: the hash is here
    export_onnx(digits.model, args.work / "digits", model_sha256=digits.sha256)
    report["builds"]["digits fp32"] = [asdict(r) for r in build_engines(args.work / "digits", log=log)]
    big = aim_rt.random_model("AiM-B", seed=0)
    big.vq = VQModel(VQConfig()).eval()
    export_onnx(big, args.work / "aim_b", dtype="float16")
    report["builds"]["AiM-B fp16 (random weights)"] = [
        asdict(r) for r in build_engines(args.work / "aim_b", log=log,
                                          graphs=("portable/step", "custom/step", "vq_decoder"))]
    (args.out / "build.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "build_log.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
