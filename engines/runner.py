"""`--backend tensorrt`: prefill engine, then the step engine with ping-pong state buffers and the device
sampling kernel of plugins/aim_kernels.cu, the decode loop captured in a CUDA graph (two steps: A→B, B→A), then
the VQ-decoder engine. Written against the TensorRT >= 10 Python API (set_tensor_address / execute_async_v3).

The engines' logits are already CFG-mixed and temperature-scaled (the CfgMix node), so the sampler runs with
uncond_rows = 0, cfg 1, temperature 1, and hands the token to the next step through `next_token`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aim_rt.config import AiMConfig
from aim_rt.errors import AiMError
from aim_rt.sampling import SamplingSettings, check_request

from .plan_meta import PlanMeta, check_plan
from .trt import require_tensorrt

_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
          "INT32": torch.int32, "UINT8": torch.uint8}


class _Engine:
    def __init__(self, trt, runtime, plan: Path):
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise AiMError(f"TensorRT could not load {plan}; rebuild it with `aim-rt export --format trt`")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in self.names}
        self.dtype = {n: _TORCH[self.engine.get_tensor_dtype(n).name] for n in self.names}

    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.names:
            t = tensors[name]
            if self.is_input[name]:
                self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())

    def run(self, stream: int) -> None:
        if not self.context.execute_async_v3(stream):
            raise AiMError("TensorRT execute_async_v3 failed")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, engines_dir: str | Path, model, variant: str = "custom"):
        from aim_rt.exporters.onnx_export import read_manifest
        from aim_rt.plugins.kernels import Kernels

        info = require_tensorrt()
        trt = info.module
        engines_dir = Path(engines_dir)
        export_dir = engines_dir.parent if (engines_dir.parent / "manifest.json").exists() else engines_dir
        self.manifest = read_manifest(export_dir)
        self.config = AiMConfig.from_official(self.manifest["config"])
        major, minor = torch.cuda.get_device_capability()
        rebuild = f"aim-rt export {model.source} --format trt --out {export_dir}"
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {}
        for graph in (f"{variant}/prefill", f"{variant}/step", "vq_decoder"):
            plan = engines_dir / (graph.replace("/", "_") + ".plan")
            if not plan.exists():
                if graph == "vq_decoder":
                    continue
                raise AiMError(f"{plan} is missing; build the engines with: {rebuild}")
            check_plan(PlanMeta.read(plan), flavour=info.flavour, version=info.version,
                       gpu_name=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}", rebuild=rebuild)
            self.engines[graph.split("/")[-1]] = _Engine(trt, runtime, plan)
        self.model = model  # the embedding tables are not needed (the step engine embeds); kept for decode fallback
        self.kernels = Kernels("float32")  # the sampler reads the float32 mixed logits
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    def sample(self, classes, seeds, settings: SamplingSettings, prefix=None):
        from aim_rt.plugins.kernels import SampleParams

        cfg = self.config
        classes, seeds, prefix = check_request(cfg.num_classes, cfg.num_tokens, cfg.vocab_size, classes, seeds, prefix)
        if prefix is not None and prefix.shape[1] != self.manifest["prefix_len"]:
            raise AiMError(f"these engines take a prefix of {self.manifest['prefix_len']} tokens")
        dev, batch = torch.device("cuda"), classes.shape[0]
        start = 0 if prefix is None else prefix.shape[1]
        pre, step = self.engines["prefill"], self.engines["step"]
        rows = 2 * batch
        state_dt = step.dtype["conv_state"]
        shape = {"conv": (cfg.n_layer, rows, cfg.conv_dim, cfg.d_conv),
                 "ssm": (cfg.n_layer, rows, cfg.nheads, cfg.headdim, cfg.d_state)}
        a = {k: torch.empty(s, device=dev, dtype=state_dt) for k, s in shape.items()}
        b = {k: torch.empty(s, device=dev, dtype=state_dt) for k, s in shape.items()}
        mods = torch.empty(cfg.n_layer, rows, 3, cfg.d_model, device=dev, dtype=pre.dtype["mods"])
        fmods = torch.empty(rows, 2, cfg.d_model, device=dev, dtype=pre.dtype["final_mods"])
        mixed = torch.empty(batch, cfg.vocab_size, device=dev)
        scale = torch.tensor(float(settings.cfg_scale), device=dev)
        temp = torch.tensor(float(settings.temperature), device=dev)
        tokens = torch.zeros(batch, cfg.num_tokens, device=dev, dtype=torch.long)
        next_token = torch.zeros(batch, device=dev, dtype=torch.long)
        position = torch.zeros((), device=dev, dtype=torch.long)
        k_step = torch.zeros(1, device=dev, dtype=torch.int32)
        seeds_d = seeds.to(dev)
        feeds = {"classes": classes.to(dev), "cfg_scale": scale, "temperature": temp, "logits": mixed,
                 "conv_state": a["conv"], "ssm_state": a["ssm"], "mods": mods, "final_mods": fmods}
        if start:
            feeds.update(prefix=prefix.to(dev), position_offset=torch.tensor(settings.position_offset, device=dev))
            tokens[:, :start] = prefix.to(dev)
        stream = torch.cuda.current_stream().cuda_stream
        pre.bind(feeds)
        pre.run(stream)
        params = SampleParams(
            logits=mixed.data_ptr(), logits_stride=cfg.vocab_size, batch=batch, vocab=cfg.vocab_size, uncond_rows=0,
            cfg_scale=1.0, temperature=1.0, top_k=settings.top_k, top_p=settings.top_p, seeds=seeds_d.data_ptr(),
            step=k_step.data_ptr(), position_offset=settings.position_offset, tokens=tokens.data_ptr(),
            num_tokens=cfg.num_tokens, teacher=None, mixed_out=None, word_emb=None, pos_emb=None, d=cfg.d_model,
            next_input=None, next_token=next_token.data_ptr())

        def draw(s: int) -> None:
            self.kernels.cfg_sample(params, s)
            self.kernels.advance(k_step.data_ptr(), s)
            position.add_(1)

        k_step.fill_(start)
        position.fill_(start + settings.position_offset)
        draw(stream)
        position.fill_(start + settings.position_offset)  # token `start` is fed at start + offset

        def one(src, dst, s):
            step.bind({"tokens": next_token, "position": position, "conv_state": src["conv"], "ssm_state": src["ssm"],
                       "mods": mods, "final_mods": fmods, "cfg_scale": scale, "temperature": temp, "logits": mixed,
                       "conv_state_out": dst["conv"], "ssm_state_out": dst["ssm"]})
            step.run(s)
            draw(s)

        remaining = cfg.num_tokens - start - 1
        pairs, odd = divmod(remaining, 2)
        if pairs:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # TensorRT allocates on its first run: keep that out of the capture
                snapshot = [t.clone() for t in (a["conv"], a["ssm"], tokens, next_token, position, k_step)]
                one(a, b, side.cuda_stream)
                one(b, a, side.cuda_stream)
                for dst, src in zip((a["conv"], a["ssm"], tokens, next_token, position, k_step), snapshot):
                    dst.copy_(src)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                s = torch.cuda.current_stream().cuda_stream
                one(a, b, s)
                one(b, a, s)
            for _ in range(pairs):
                graph.replay()
        if odd:
            one(a, b, stream)
        return tokens.cpu()

    def decode(self, tokens):
        vq = self.engines.get("vq_decoder")
        if vq is None:
            raise AiMError("no VQ-decoder engine was built for this model")
        tokens = torch.as_tensor(tokens, device="cuda").long()
        out_shape = [tokens.shape[0]] + list(vq.engine.get_tensor_shape("images"))[1:]
        images = torch.empty(out_shape, device="cuda", dtype=vq.dtype["images"])
        vq.bind({"tokens": tokens, "images": images})
        vq.run(torch.cuda.current_stream().cuda_stream)
        if images.dtype == torch.uint8:
            return images.permute(0, 3, 1, 2).float() / 127.5 - 1
        return images.float()
