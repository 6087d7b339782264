"""`--backend tensorrt`: prefill engine, then the step engine with ping-pong state buffers and the device
sampling kernel of plugins/aim_kernels.cu, the decode loop captured in a CUDA graph (two steps: A→B, B→A), then
the VQ-decoder engine. Written against the TensorRT >= 10 Python API (set_tensor_address / execute_async_v3).

The engines' logits are already CFG-mixed and temperature-scaled (the CfgMix node), so the sampler runs with
uncond_rows = 0, cfg 1, temperature 1, and hands the token to the next step through `next_token`.

Like the cuda backend, sampling keeps a device-resident loop; teacher forcing and the record of mixed logits
run the engines through `TensorRTDecoder` and the one loop, aim_rt.decoding.decode. One captured graph, with the
static buffers it reads and writes, per `graph_key` (see there), kept for the backend's lifetime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from aim_rt.config import AiMConfig
from aim_rt import decoding
from aim_rt.errors import AiMError
from aim_rt.sampling import SamplingSettings

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


def graph_key(batch: int, settings: SamplingSettings) -> tuple:
    """What a captured decode graph bakes in: the batch (buffer shapes and addresses) and the settings the
    sampling kernel takes by value. cfg_scale and temperature are device scalars, seeds, start and prefix live
    in buffers: they change without a new capture."""
    return (batch, settings.top_k, settings.top_p, settings.position_offset)


class GraphCache:
    """key → what `capture(key)` made (static buffers and the CUDA graph over them), each key captured once."""

    def __init__(self, capture: Callable[[tuple], object]):
        self._capture = capture
        self._entries: dict[tuple, object] = {}

    def get(self, key: tuple):
        if key not in self._entries:
            self._entries[key] = self._capture(key)
        return self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class _Workspace:
    """The static device buffers of one graph key (their addresses are baked into `graph`)."""

    a: dict            # ping: conv (L, 2B, C, W), ssm (L, 2B, H, P, N)
    b: dict            # pong
    mods: torch.Tensor
    fmods: torch.Tensor
    mixed: torch.Tensor       # (B, V) float32: the engines' CfgMix output
    scale: torch.Tensor       # () cfg_scale
    temp: torch.Tensor        # () temperature
    tokens: torch.Tensor      # (B, num_tokens) int64
    next_token: torch.Tensor  # (B,) int64: the token the next step embeds
    position: torch.Tensor    # () int64
    k_step: torch.Tensor      # (1,) int32: the token index the sampler draws next
    seeds: torch.Tensor       # (B,) int64
    params: object = None     # SampleParams over these buffers
    graph: torch.cuda.CUDAGraph | None = None  # two steps, A→B then B→A


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
        self._graphs = GraphCache(self._capture)

    # ----- the engines, one call each ---------------------------------------------------------------
    def _states(self, rows: int) -> dict:
        cfg, dt = self.config, self.engines["step"].dtype["conv_state"]
        return {"conv": torch.zeros(cfg.n_layer, rows, cfg.conv_dim, cfg.d_conv, device="cuda", dtype=dt),
                "ssm": torch.zeros(cfg.n_layer, rows, cfg.nheads, cfg.headdim, cfg.d_state, device="cuda", dtype=dt)}

    def _run_prefill(self, classes, prefix, position_offset: int, scale, temp, state: dict, mods, fmods, mixed,
                     stream: int) -> None:
        start = 0 if prefix is None else prefix.shape[1]
        if start != self.manifest["prefix_len"]:
            raise AiMError(f"these engines take a prefix of {self.manifest['prefix_len']} tokens, the request has "
                           f"{start}; export with `aim-rt export --prefix-len {start} --format trt`")
        feeds = {"classes": classes.to("cuda"), "cfg_scale": scale, "temperature": temp, "logits": mixed,
                 "conv_state": state["conv"], "ssm_state": state["ssm"], "mods": mods, "final_mods": fmods}
        if start:
            feeds.update(prefix=prefix.to("cuda"), position_offset=torch.tensor(position_offset, device="cuda"))
        self.engines["prefill"].bind(feeds)
        self.engines["prefill"].run(stream)

    def _run_step(self, tokens, position, src: dict, dst: dict, mods, fmods, scale, temp, mixed, stream: int) -> None:
        step = self.engines["step"]
        step.bind({"tokens": tokens, "position": position, "conv_state": src["conv"], "ssm_state": src["ssm"],
                   "mods": mods, "final_mods": fmods, "cfg_scale": scale, "temperature": temp, "logits": mixed,
                   "conv_state_out": dst["conv"], "ssm_state_out": dst["ssm"]})
        step.run(stream)

    def decoder(self, settings: SamplingSettings) -> "TensorRTDecoder":
        return TensorRTDecoder(self, settings.cfg_scale, settings.temperature)

    # ----- the device-resident sampler --------------------------------------------------------------
    def _workspace(self, batch: int, settings: SamplingSettings) -> _Workspace:
        return self._graphs.get(graph_key(batch, settings))

    def _capture(self, key: tuple) -> _Workspace:
        """Allocate one key's buffers, warm the step up (TensorRT allocates on its first run), capture two steps."""
        from aim_rt.plugins.kernels import SampleParams

        batch, top_k, top_p, position_offset = key
        cfg, dev, rows = self.config, torch.device("cuda"), 2 * batch
        pre = self.engines["prefill"]
        ws = _Workspace(
            a=self._states(rows), b=self._states(rows),
            mods=torch.zeros(cfg.n_layer, rows, 3, cfg.d_model, device=dev, dtype=pre.dtype["mods"]),
            fmods=torch.zeros(rows, 2, cfg.d_model, device=dev, dtype=pre.dtype["final_mods"]),
            mixed=torch.zeros(batch, cfg.vocab_size, device=dev), scale=torch.ones((), device=dev),
            temp=torch.ones((), device=dev), tokens=torch.zeros(batch, cfg.num_tokens, device=dev, dtype=torch.long),
            next_token=torch.zeros(batch, device=dev, dtype=torch.long),
            position=torch.zeros((), device=dev, dtype=torch.long), k_step=torch.zeros(1, device=dev, dtype=torch.int32),
            seeds=torch.zeros(batch, device=dev, dtype=torch.long))
        ws.params = SampleParams(
            logits=ws.mixed.data_ptr(), logits_stride=cfg.vocab_size, batch=batch, vocab=cfg.vocab_size, uncond_rows=0,
            cfg_scale=1.0, temperature=1.0, top_k=top_k, top_p=top_p, seeds=ws.seeds.data_ptr(),
            step=ws.k_step.data_ptr(), position_offset=position_offset, tokens=ws.tokens.data_ptr(),
            num_tokens=cfg.num_tokens, teacher=None, mixed_out=None, word_emb=None, pos_emb=None, d=cfg.d_model,
            next_input=None, next_token=ws.next_token.data_ptr())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # changes the buffers: sample() fills them after this
            self._one(ws, ws.a, ws.b, side.cuda_stream)
            self._one(ws, ws.b, ws.a, side.cuda_stream)
        torch.cuda.current_stream().wait_stream(side)
        ws.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(ws.graph):
            s = torch.cuda.current_stream().cuda_stream
            self._one(ws, ws.a, ws.b, s)
            self._one(ws, ws.b, ws.a, s)
        return ws

    def _draw(self, ws: _Workspace, stream: int) -> None:
        self.kernels.cfg_sample(ws.params, stream)
        self.kernels.advance(ws.k_step.data_ptr(), stream)
        ws.position.add_(1)

    def _one(self, ws: _Workspace, src: dict, dst: dict, stream: int) -> None:
        self._run_step(ws.next_token, ws.position, src, dst, ws.mods, ws.fmods, ws.scale, ws.temp, ws.mixed, stream)
        self._draw(ws, stream)

    def sample(self, classes, seeds, settings: SamplingSettings, prefix=None, teacher=None, return_mixed=False):
        if teacher is not None or return_mixed:  # parity checks: the one loop over the same engines
            return decoding.decode(self.decoder(settings), classes, seeds, settings, prefix, teacher, return_mixed)
        cfg = self.config
        classes, seeds, prefix, _ = decoding.check_request(cfg, classes, seeds, prefix)
        batch = classes.shape[0]
        start = 0 if prefix is None else prefix.shape[1]
        ws = self._workspace(batch, settings)  # captured before the prefill fills the buffers
        ws.seeds.copy_(seeds)
        ws.scale.fill_(float(settings.cfg_scale))
        ws.temp.fill_(float(settings.temperature))
        ws.tokens.zero_()
        if start:
            ws.tokens[:, :start] = prefix.to("cuda")
        stream = torch.cuda.current_stream().cuda_stream
        self._run_prefill(classes, prefix, settings.position_offset, ws.scale, ws.temp, ws.a, ws.mods, ws.fmods,
                          ws.mixed, stream)
        ws.k_step.fill_(start)
        self._draw(ws, stream)  # token `start` from the prefill's logits
        ws.position.fill_(start + settings.position_offset)  # token `start` is fed at start + offset
        pairs, odd = divmod(cfg.num_tokens - start - 1, 2)
        for _ in range(pairs):
            ws.graph.replay()
        if odd:
            self._one(ws, ws.a, ws.b, stream)
        return ws.tokens.cpu()

    def decode(self, tokens):
        vq = self.engines.get("vq_decoder")
        tokens = torch.as_tensor(tokens, device="cuda").long()
        if vq is None:  # no VQ engine built: the native fast decoder over the model's own VQ
            return self._fallback_vq(tokens)
        out_shape = [tokens.shape[0]] + list(vq.engine.get_tensor_shape("images"))[1:]
        images = torch.empty(out_shape, device="cuda", dtype=vq.dtype["images"])
        vq.bind({"tokens": tokens, "images": images})
        vq.run(torch.cuda.current_stream().cuda_stream)
        if images.dtype == torch.uint8:
            return images.permute(0, 3, 1, 2).float() / 127.5 - 1
        return images.float()


class TensorRTDecoder:
    """The prefill and step engines for one (cfg_scale, temperature), run eagerly on the current stream;
    the state is (conv, ssm) on the device plus the modulations, written to fresh buffers at each step."""

    def __init__(self, backend: TensorRTBackend, cfg_scale: float, temperature: float):
        self.backend, self.config = backend, backend.config
        self.mixed_with = (cfg_scale, temperature)
        self._scale = torch.tensor(float(cfg_scale), device="cuda")
        self._temp = torch.tensor(float(temperature), device="cuda")

    def prefill(self, classes, prefix, position_offset: int):
        cfg, pre, batch = self.config, self.backend.engines["prefill"], classes.shape[0]
        rows = 2 * batch
        state = self.backend._states(rows)
        state["mods"] = torch.empty(cfg.n_layer, rows, 3, cfg.d_model, device="cuda", dtype=pre.dtype["mods"])
        state["fmods"] = torch.empty(rows, 2, cfg.d_model, device="cuda", dtype=pre.dtype["final_mods"])
        mixed = torch.empty(batch, cfg.vocab_size, device="cuda")
        self.backend._run_prefill(classes, prefix, position_offset, self._scale, self._temp, state, state["mods"],
                                  state["fmods"], mixed, torch.cuda.current_stream().cuda_stream)
        return mixed, state

    def step(self, tokens, position: int, state: dict):
        out = {**state, **self.backend._states(state["conv"].shape[1])}
        mixed = torch.empty(tokens.shape[0], self.config.vocab_size, device="cuda")
        self.backend._run_step(tokens.to("cuda"), torch.tensor(position, device="cuda"), state, out, state["mods"],
                               state["fmods"], self._scale, self._temp, mixed, torch.cuda.current_stream().cuda_stream)
        return mixed, out

    def _fallback_vq(self, tokens):
        from aim_rt.vq_fast import FastVQDecoder

        model_vq = getattr(self.model, "vq", None)
        if model_vq is None:
            raise AiMError("no VQ-decoder engine was built and the model has no VQ tokenizer to decode with")
        n = model_vq.config.n_embed
        if ((tokens < 0) | (tokens >= n)).any():
            raise AiMError(f"tokens must lie in [0, {n})")
        if getattr(self, "_vq", None) is None:
            dtype = torch.bfloat16 if model_vq.dtype == torch.float32 else model_vq.dtype
            self._vq = FastVQDecoder(model_vq.to("cuda"), dtype)
        return self._vq(tokens)
