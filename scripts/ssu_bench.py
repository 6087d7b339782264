"""The selective-state-update kernel, old against new, in one process: outputs compared bit for bit, time per
launch as bytes moved against the copy bandwidth, and (optionally) whole decode steps with either kernel.

    PYTHONPATH=. python scripts/ssu_bench.py --out results/ --old-source old_aim_kernels.cu
    ncu ... python scripts/ssu_bench.py --profile AiM-B:16:new,AiM-B:16:old --old-source ...   (a few plain launches)

`--old-source`: an earlier aim_kernels.cu (e.g. `git show main:plugins/aim_kernels.cu`), whose state update is
launched as the current one is (resident blocks, each a run of slices: the ssu3 kernel and later), or with
`--old-per-slice` as kernels before ssu3 were (one block per (row, head), 256 threads). Each timing is a CUDA graph of launches that
cycle through enough distinct state copies (>= 300 MB) that no state is served from L2, as in a real step where
the weights of every layer stream through between two updates of one layer's state. Kernels are launched as
the cuda backend does (finish=False, programmatic dependent launch on Hopper); "pdl_off" rows launch plainly.
Bytes are those the op must move (aim_rt.bench.op_bytes).
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

import aim_rt
from aim_rt.bench import copy_bandwidth, op_bytes, replay_us
from aim_rt.plugins.kernels import PDL_EARLY_ANY, Kernels, kernel_arch, kernel_builds, ssu_params

# new-kernel compile-time variants (the first is the default build)
VARIANTS = {  # (run 2 of 2026-11-29 measured at 2c473d1, where the default was SSU_MIN_BLOCKS=4: "new" there is
    # "new_min4" here, "new_min3" there is "new" here)
    "new": {},
    "new_generic": {"SSU_FAST": 0},  # no constant-shape instance: the run-time shape path for every shape
    "new_s3": {"SSU_STAGES": 3},
    # 2026-12-04 (evening): the warp kernel (aim_ssu_warps) from 1 row, and its shapes. Until ssw2_* the default
    # was 4 warps x 3 blocks per SM, so "ssw" in ssw_* and ssw2_* is "ssw_w4" here
    "ssw": {"SSU_WARP_ROWS": 1},
    "nossw": {"SSU_WARP_ROWS": 1 << 30},  # the block kernel at every row count
    "ssw_w4": {"SSU_WARP_ROWS": 1, "SSW_WARPS": 4, "SSW_MIN_BLOCKS": 3},
    "ssw_s3": {"SSU_WARP_ROWS": 1, "SSW_WARPS": 4, "SSW_STAGES": 3, "SSW_MIN_BLOCKS": 3},
    "ssw_s2": {"SSU_WARP_ROWS": 1, "SSW_WARPS": 4, "SSW_STAGES": 2, "SSW_MIN_BLOCKS": 5},
    "ssw_w8s2": {"SSU_WARP_ROWS": 1, "SSW_WARPS": 8, "SSW_STAGES": 2, "SSW_MIN_BLOCKS": 2},
    "ssw_w2": {"SSU_WARP_ROWS": 1, "SSW_WARPS": 2, "SSW_MIN_BLOCKS": 6},  # smaller blocks: resident earlier
    "ssw_w1": {"SSU_WARP_ROWS": 1, "SSW_WARPS": 1, "SSW_MIN_BLOCKS": 12},
    "early_ssu": {"PDL_EARLY_SSU": PDL_EARLY_ANY},  # the state update lets out_proj launch at once
    "ssw_s3w2": {"SSU_WARP_ROWS": 1, "SSW_STAGES": 3, "SSW_MIN_BLOCKS": 7},  # 14 warps per SM
    "ssw_s2w2": {"SSU_WARP_ROWS": 1, "SSW_STAGES": 2, "SSW_MIN_BLOCKS": 10},  # 20 warps per SM
    "cublas": {"AIM_GEMM": 0},  # no aim_gemm: cuBLAS for 33-128 rows (as before 2026-12-02's third session)
    "gemm_lo": {"GEMM_MIN_ROWS": 9},  # aim_gemm from 9 rows (batch 5 with guidance), aim_gemv below
    "gemm_all": {"GEMM_MIN_ROWS": 17, "GEMM_MAX_ROWS": 128},  # aim_gemm from batch 9 to 64 whatever the model
    "nom2": {"GEMM_M2": 0},  # aim_gemm without its 32-row instance (m4 from 1 to 64 rows, as before)
    "gemm_min32": {"GEMM_MIN_ROWS": 32},  # AiM-XL's aim_gemm rows before aim_gemm_m2
    "gemm_min33": {"GEMM_MIN_ROWS": 33},  # AiM-L's
    "new_min4": {"SSU_MIN_BLOCKS": 4},
    "new_cs": {"SSU_STORE_CS": 1},
    "new_t512": {"SSU_THREADS": 512, "SSU_MIN_BLOCKS": 2},
    # builds for one model's shapes (aim_kernels.cu: only the instances that model runs); measured at 7221f6d
    # with its GEMV_NARROW_MT / GEMV_NARROW_MT_CHS (bench/results/{lean,mt,mt2,mt3,mt4}_*), since replaced by the
    # Y instances: "norm6_mt1" there is what the cuda backend now builds for AiM-XL
    "lean": {"SSU_GENERIC": 0},
    "norm3": {"NORM_PER_ONLY": 3},
    "norm4": {"NORM_PER_ONLY": 4},
    "norm6": {"NORM_PER_ONLY": 6},
    # the cuda backend's build for a preset (gemv_depths and d_model of that model: plugins/kernels.py's
    # model_defines and gemv_m1_chunks)
    "build_b": {"_model": "AiM-B"},
    "build_l": {"_model": "AiM-L"},
    "build_xl": {"_model": "AiM-XL"},
    # 2026-12-02, combined with a build as "build_b+early_gn": each kind of kernel's early-launch limit
    # (measured with 1 << 20, the same as PDL_EARLY_ANY: no row count reaches either)
    "early_gemv": {"PDL_EARLY_GEMV": PDL_EARLY_ANY},
    "early_norm": {"PDL_EARLY_NORM": PDL_EARLY_ANY},
    "early_gn": {"PDL_EARLY_GEMV": PDL_EARLY_ANY, "PDL_EARLY_NORM": PDL_EARLY_ANY},
    # 2026-12-03 (eighth session): up to how many rows the residual add between layers is folded into out_proj
    # (FOLD_ROWS, host side; 0: never, the norm kernel does it). At 1b3576f "fold_in" (FOLD_IN_PROJ 1) also had
    # in_proj norm its own x (bench/results/fold*_h200_2026-12-03.*: slower, removed)
    "nofold": {"FOLD_ROWS": 0},
    "fold8": {"FOLD_ROWS": 8},
    "nofoldgemm": {"FOLD_GEMM": 0},  # 2026-12-03 ninth session: no aim_gemm_resid (aim_gemm out_proj unfolded)
    "foldgemm_all": {"FOLD_GEMM": 2},  # every aim_gemm_resid instance (m2, m4, m8)
    "nofoldgemm2": {"FOLD_GEMM_M2": 0},  # 2026-12-04: AiM-XL's 17-32 rows unfolded (only m4 folds, as v22)
    "fold16": {"FOLD_ROWS": 16},  # AiM-B: out_proj folded up to 16 rows (as until 2026-12-03's ninth session)
    "fold32": {"FOLD_ROWS": 32},  # AiM-B's 17-32 rows folded too, into the wide-tile product
    "gemv32": {"GEMM_MIN_ROWS": 33},  # AiM-L / XL: aim_gemv up to 32 rows (aim_gemm_m2 there by default)
    "gemv32f": {"GEMM_MIN_ROWS": 33, "FOLD_ROWS": 32},  # ... and out_proj folded up to 32 rows
    "rm1": {"RESID_M1_ROWS": 16},  # out_proj's folded one-m-tile instance up to 16 rows (at AiM-B: as measured)
    "rm0": {"RESID_M1_ROWS": 0},  # never
    # 2026-12-04: aim_gemm's pipeline depth per instance (GEMM_STAGES_M<mt>; 4 before, "gs_4"; since then 8 / 6 / 4
    # for AiM-XL, 4 / 6 / 4 for AiM-L: model_defines)
    "gs_4": {"GEMM_STAGES_M2": 4, "GEMM_STAGES_M4": 4, "GEMM_STAGES_M8": 4},
    "gs2_6": {"GEMM_STAGES_M2": 6},
    "gs2_8": {"GEMM_STAGES_M2": 8},
    "gs2_9": {"GEMM_STAGES_M2": 9},
    "gs4_6": {"GEMM_STAGES_M4": 6},
    "gs4_7": {"GEMM_STAGES_M4": 7},
    "gs8_5": {"GEMM_STAGES_M8": 5},
    "gs4_3": {"GEMM_STAGES_M4": 3},
    "gs8_3": {"GEMM_STAGES_M8": 3},
    # aim_gemm's k split aimed at this many CTAs instead of one per SM (GEMM_CTAS, host side; H200: 132 SMs)
    "ctas66": {"GEMM_CTAS": 66},
    "ctas264": {"GEMM_CTAS": 264},
    "foldctas264": {"GEMM_FOLD_CTAS": 264},  # the folded out_proj's only (AiM-XL: k split 8 instead of 6)
    "foldctas132": {"GEMM_FOLD_CTAS": 132},  # as until then (since 264, 2 per SM, is the default)
    "gemm17": {"GEMM_MIN_ROWS": 17},  # aim_gemm from 17 rows (AiM-B: from 33 by default)
    "gemm9": {"GEMM_MIN_ROWS": 9},  # aim_gemm from 9 rows (AiM-XL: from 17 until 2026-12-04, now 3)
    "gemm1": {"GEMM_MIN_ROWS": 1},  # aim_gemm from 1 row
    "m2fold": {"FOLD_GEMM_M2": 1},  # the 32-row aim_gemm folds too (AiM-XL's default)
    "max128": {"GEMM_MAX_ROWS": 128},  # AiM-L / XL: aim_gemm up to 128 rows (cuBLAS above 64 by default)
    "foldmax128": {"GEMM_FOLD_MAX_ROWS": 128, "FOLD_GEMM_M8": 1},  # ... only the folded out_proj (in_proj cuBLAS)
    "foldmax64": {"GEMM_FOLD_MAX_ROWS": 64},  # AiM-L / XL's folded out_proj on cuBLAS past 64 rows (as v23)
    # decode steps per replayed graph (CudaBackend.steps_per_graph; host side)
    "g1": {"_steps_per_graph": 1},
    "g4": {"_steps_per_graph": 4},
    "g8": {"_steps_per_graph": 8},
    "g32": {"_steps_per_graph": 32},
    # 2026-12-05 (third session): the folded out_proj lets the next norm launch at once (PDL_EARLY_FOLD;
    # PDL_EARLY_GEMV by default). (At 8f540a8 "l2ahead0": in_proj pulling its layer's SSM state into L2 before
    # it waits, measured in bench/results/kernels_l2ahead_h100_2026-12-05.*: no gain at AiM-B b1, +3.5 % at b16;
    # removed)
    "early_fold": {"PDL_EARLY_FOLD": PDL_EARLY_ANY},
    # 2026-12-05 (fourth session): in_proj norms its own x up to this many rows (NORM_FOLD_ROWS, host side;
    # GemvNormParams in aim_kernels.cu): the norm kernel only before the first layer and after the last
    "nf0": {"NORM_FOLD_ROWS": 0},
    "nf2": {"NORM_FOLD_ROWS": 2},
    "nf32": {"NORM_FOLD_ROWS": 32},
    "nmb5": {"GEMV_NORM_MIN_BLOCKS": 5},  # the narrow normed in_proj at 5 blocks per SM (default: 0, as compiled)
    # 2026-12-06: in_proj norming its own x on aim_gemm's rows too (aim_gemm_norm_m*, GEMM_NORM); 0: not there
    # (bench/results/gemmnorm_h100_2026-12-06.*: AiM-XL b8 / 16 -4.6 / -2.0 %, AiM-B b17 / 32 +2.5 / +5.4 %, so
    # model_defines builds it from d_model 1536)
    "gn0": {"GEMM_NORM": 0},
    "gn6": {"GEMM_NORM": 2 | 4},  # AiM-L's and XL's aim_gemm rows (3/24-64)
    "gn12": {"GEMM_NORM": 4 | 8},  # AiM-B's (33-128)
    "gn2": {"GEMM_NORM": 2},  # only the 32-row instance (AiM-L: batch 12-16, with m2fold so that out_proj folds)
    # 2026-12-06 (seventh session): aim_gemm on wgmma (GEMM_WGMMA, the default on sm_90a); 0: ldmatrix + mma.sync
    "wg0": {"GEMM_WGMMA": 0},
    # (2026-12-06, seventh session: "pf32", the state update pulling the next layer's in_proj weights into L2 and
    # in_proj its out_proj's, up to 32 rows (cp.async.bulk.prefetch.L2), measured in bench/results/wg_h100_
    # 2026-12-06.*: AiM-B b1 even, b16 -1.2 %, AiM-XL b1 +6.5 %, b16 +19 %; removed)
    # the new defaults' opposites (model_defines since then): AiM-B's 128-row out_proj unfolded, AiM-L's in_proj
    # on cuBLAS past 64 rows
    "nofold8": {"FOLD_GEMM_M8": 0},
    "max64": {"GEMM_MAX_ROWS": 64},
    # (2026-12-05: "pair" / "gemvpair", the wide-tile products on cluster pairs splitting k, measured at 247ad49 /
    # 01ffad1 in bench/results/pair*_2026-12-05.*, slower in whole steps and removed with their kernels)
}
CAPS = (2, 3)  # the default build with at most this many blocks per SM
CASES = [("AiM-B", 1), ("AiM-B", 16), ("AiM-B", 64), ("AiM-XL", 1), ("AiM-XL", 16), ("AiM-XL", 64)]


class OldKernels(Kernels):
    """An earlier aim_kernels.cu, its state update launched as it was: one block per (row, head)."""

    def selective_state_update(self, p, stream, finish=True):
        smem = (3 * p.headdim + 2 * p.d_state) * 4
        self._launch("aim_selective_state_update", (p.nheads, p.rows, 1), 256, smem, stream, p)
        assert not finish


def known(name):
    return all(part in VARIANTS for part in name.split("+"))


def variant(name):
    """A variant's settings: "a+b" merges VARIANTS a and b."""
    merged = {}
    for part in name.split("+"):
        merged.update(VARIANTS[part])
    return merged


def build_args(name):
    """Kernels(...) keywords of a variant: its defines, and for a preset's build the gemv depths and d_model the
    cuda backend passes for it."""
    v = variant(name)
    defines = {k: val for k, val in v.items() if not k.startswith("_")}
    if "_model" not in v:
        return {"defines": defines}
    cfg = aim_rt.preset(v["_model"])
    return {"defines": defines, "gemv_depths": (cfg.d_model, cfg.d_inner), "d_model": cfg.d_model}


def make_kernels(name):
    return Kernels("bfloat16", **build_args(name))


def build_kernels(old_source, names, old_per_slice=False, old_builds=()):
    major, minor = torch.cuda.get_device_capability()
    arch = kernel_arch(major, minor)
    t = time.perf_counter()
    # every build at once (NVRTC is slow and releases the GIL): the programs each Kernels below loads
    builds = [b for n in names if known(n) for b in kernel_builds("bfloat16", arch, **build_args(n))]
    builds += kernel_builds("float32", arch)  # not used here: cached for the tests that follow
    if old_source:  # Kernels or OldKernels: the same builds
        builds += kernel_builds("bfloat16", arch, source_path=Path(old_source))
        # "old+build_b": the old source as the cuda backend builds it for that preset
        builds += [b for n in old_builds for b in kernel_builds("bfloat16", arch, source_path=Path(old_source),
                                                               **build_args(n))]
    for b in builds:
        b.result()
    print(f"compiled {len(builds)} modules in {time.perf_counter() - t:.1f} s", flush=True)
    kernels = {n: make_kernels(n) for n in names if known(n)}
    if old_source:
        kernels["old"] = (OldKernels if old_per_slice else Kernels)("bfloat16", source_path=Path(old_source))
        for n in old_builds:
            kernels["old+" + n] = Kernels("bfloat16", source_path=Path(old_source), **build_args(n))
    return kernels


class Case:
    """Inputs of one (model, batch) with `slots` distinct layer states."""

    def __init__(self, model, batch, min_bytes=300e6):
        cfg = self.cfg = aim_rt.preset(model)
        rows = self.rows = 2 * batch
        dev, dt = "cuda", torch.bfloat16
        per_slot = rows * (cfg.nheads * cfg.headdim * cfg.d_state + cfg.conv_dim * cfg.d_conv) * 2
        self.slots = max(4, math.ceil(min_bytes / per_slot))
        torch.manual_seed(0)
        r = lambda *s, scale=1.0: (scale * torch.randn(*s, device=dev)).to(dt)  # noqa: E731
        self.zxbcdt = r(rows, cfg.d_in_proj)
        self.conv = r(self.slots, rows, cfg.conv_dim, cfg.d_conv)
        self.ssm = r(self.slots, rows, cfg.nheads, cfg.headdim, cfg.d_state)
        self.weights = dict(conv_weight=r(cfg.conv_dim, 1, cfg.d_conv, scale=0.5), conv_bias=r(cfg.conv_dim, scale=0.1),
                            dt_bias=r(cfg.nheads, scale=0.5) - 3, A_log=r(cfg.nheads, scale=0.5) + 1, D=r(cfg.nheads),
                            norm_weight=1 + r(cfg.d_inner, scale=0.1))
        self.conv0, self.ssm0 = self.conv[0].clone(), self.ssm[0].clone()  # timing updates the slots in place
        self.y = torch.zeros(rows, cfg.d_inner, device=dev, dtype=dt)
        self.sumsq = torch.zeros(rows, cfg.nheads, device=dev)
        self.bytes = op_bytes(cfg, batch, 2)["selective_state_update"]

    def params(self, conv, ssm, y=None, sumsq=None):
        cfg, z = self.cfg, self.zxbcdt
        d_in, d_x = cfg.d_inner, cfg.d_inner + cfg.conv_dim
        return ssu_params(xbc=z[:, d_in:d_x], z=z[:, :d_in], dt=z[:, d_x:], conv_state_in=conv, conv_state_out=conv,
                          ssm_state_in=ssm, ssm_state_out=ssm, weights=self.weights,
                          sumsq=self.sumsq if sumsq is None else sumsq, y=self.y if y is None else y,
                          headdim=cfg.headdim, d_state=cfg.d_state, ngroups=cfg.ngroups, eps=cfg.norm_eps)

    def outputs(self, k):
        """One launch on copies of slot 0 as made: (y, sumsq, x conv windows, ssm state)."""
        conv, ssm = self.conv0.clone(), self.ssm0.clone()
        y, sumsq = torch.zeros_like(self.y), torch.zeros_like(self.sumsq)
        k.selective_state_update(self.params(conv, ssm, y, sumsq), torch.cuda.current_stream().cuda_stream, finish=False)
        torch.cuda.synchronize()
        return [y, sumsq, conv[:, :self.cfg.d_inner], ssm]

    def time(self, k, launches=120, replays=7):
        ps = [self.params(self.conv[i], self.ssm[i]) for i in range(self.slots)]
        n = max(launches, self.slots)
        for i in range(min(n, 8)):  # warm-up: module, attributes
            k.selective_state_update(ps[i % self.slots], torch.cuda.current_stream().cuda_stream, finish=False)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n):
                k.selective_state_update(ps[i % self.slots], torch.cuda.current_stream().cuda_stream, finish=False)
        graph.replay()
        us = replay_us(graph, n, replays)
        del graph
        return us


def grid_of(k, case):
    if isinstance(k, OldKernels):
        return case.rows * case.cfg.nheads, None
    name, grid, threads, smem = k.ssu_launch(case.params(case.conv[0], case.ssm[0]))
    return grid, k._ssu_blocks_per_sm(smem, name, threads)  # grid (blocks), blocks resident per SM


def kernel_table(kernels, cases, bandwidth, log):
    rows = []
    for model, batch in cases:
        case = Case(model, batch)
        ref = case.outputs(kernels["old"]) if "old" in kernels else None
        row = {"model": model, "batch": batch, "bytes": case.bytes, "slots": case.slots, "runs": {}}
        runs = [(n, k, None, True) for n, k in kernels.items()]
        runs += [(f"new_cap{c}", kernels["new"], c, True) for c in CAPS]
        runs += [(f"{n}_pdl_off", kernels[n], None, False) for n in ("old", "new") if n in kernels]
        for name, k, cap, pdl in runs:
            k.ssu_max_blocks = cap * k.num_sms if cap else None
            saved, k.pdl = k.pdl, k.pdl and pdl
            try:
                same = None
                if ref is not None and cap is None and pdl:
                    same = all(torch.equal(a, b) for a, b in zip(case.outputs(k), ref))
                us = case.time(k)
                grid = grid_of(k, case)
            except Exception as e:  # a variant that fails to launch is reported, not fatal
                log(f"{model} b{batch} {name}: FAILED {e!r}")
                row["runs"][name] = {"error": repr(e)}
                continue
            finally:
                k.pdl = saved
                k.ssu_max_blocks = None
            gbps = case.bytes / us / 1e3
            row["runs"][name] = {"us": us, "GBps": gbps, "of_copy": gbps * 1e9 / bandwidth,
                                 "grid": grid, "outputs_equal_old": same}
            log(f"{model:7s} b{batch:<3d} {name:16s} {us:8.2f} us {case.bytes / 1e6:8.2f} MB {gbps:7.0f} GB/s "
                f"{gbps * 1e9 / bandwidth:5.0%}  grid {grid}  same-as-old {same}")
        rows.append(row)
        del case
        torch.cuda.empty_cache()
    return rows


def step_table(kernels, specs, log, save, names=("old", "new"), repeats=1, op_times=False):
    """Whole decode steps of the cuda backend (graph replay) with each named state update (`repeats` rounds,
    alternating, in one process: the step's run-to-run spread is a few percent)."""
    from aim_rt.cuda_backend import CudaBackend
    from aim_rt.sampling import SamplingSettings

    settings, rows = SamplingSettings(), []
    by_model = {}
    for model, batch in specs:
        by_model.setdefault(model, []).append(batch)
    all_names = names
    for model, batches in by_model.items():
        # a preset's build runs only on its own model; the others on every model
        names = [n for n in all_names if n == "old" or variant(n.removeprefix("old+")).get("_model", model) == model]
        m = aim_rt.random_model(model, seed=0, device="cuda", dtype=torch.bfloat16)
        backend = CudaBackend(m)
        for batch in batches:
            classes, seeds = torch.arange(batch) % m.config.num_classes, torch.arange(batch)
            row, tokens = {"model": model, "batch": batch}, {}
            for _ in range(repeats):
                for name in names:
                    backend.kernels = kernels[name]
                    backend.steps_per_graph = variant(name.removeprefix("old+")).get("_steps_per_graph", 1)
                    backend._graphs.clear()
                    tokens[name] = backend.sample(classes, seeds, settings)
                    us = backend.phase_times(batch, settings)["replays_us_per_step"]
                    row.setdefault(name + "_us_per_step_runs", []).append(us)
                    if op_times:  # each kind of op alone (CudaBackend.op_timings), µs per launch
                        ops = backend.op_timings(batch, settings)["ops"]
                        row.setdefault(name + "_ops", []).append({k: v["us_per_launch"] for k, v in ops.items()})
            for name in names:
                runs = row[name + "_us_per_step_runs"]
                row[name + "_us_per_step"] = sorted(runs)[len(runs) // 2]
            # each variant's tokens against the first variant's (one differing build no longer hides the others)
            row["tokens_equal_first"] = {n: bool(torch.equal(tokens[names[0]], tokens[n])) for n in names[1:]}
            row["tokens_equal"] = all(row["tokens_equal_first"].values())
            if op_times:
                for name in names:
                    last = row[name + "_ops"][-1]
                    log(f"  ops {model} b{batch} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in last.items()))
            log(f"step {model} b{batch}: " + ", ".join(
                f"{n} " + " / ".join(f"{u:.1f}" for u in row[n + "_us_per_step_runs"]) for n in names)
                + f" us per step; tokens equal to {names[0]}'s: "
                + ", ".join(f"{n} {same}" for n, same in row["tokens_equal_first"].items()))
            rows.append(row)
            save(rows)
        del backend, m
        torch.cuda.empty_cache()
    return rows


def profile(kernels, spec):
    """Plain launches for Nsight Compute: each listed (model, batch, variant) launched twice."""
    for item in spec.split(","):
        model, batch, name = item.split(":")
        case = Case(model, int(batch), min_bytes=0)
        for _ in range(2):
            case.outputs(kernels[name])
        print("profiled", item, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--old-source")
    ap.add_argument("--old-per-slice", action="store_true",
                    help="the old source's state update is a pre-ssu3 one (one block per (row, head))")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cases", default=",".join(f"{m}:{b}" for m, b in CASES))
    ap.add_argument("--steps", default="", help="model:batch,... for whole-step timing (old vs new)")
    ap.add_argument("--step-variants", default="old,new", help="kernels compared in --steps")
    ap.add_argument("--step-repeats", type=int, default=1, help="rounds of --steps, alternating the kernels")
    ap.add_argument("--op-times", action="store_true", help="with --steps: each kind of op timed alone too")
    ap.add_argument("--profile", help="model:batch:variant,... plain launches only (for ncu)")
    ap.add_argument("--tag", default="ssu3")
    args = ap.parse_args()
    names, step_names = args.variants.split(","), args.step_variants.split(",")
    missing = [n for n in step_names if args.steps and not n.startswith("old") and n not in names]
    if missing:  # the step table runs the kernels that --variants built
        raise SystemExit(f"--step-variants {','.join(missing)} must be in --variants too")
    old_builds = [n.removeprefix("old+") for n in step_names if n.startswith("old+")]
    kernels = build_kernels(args.old_source, names, args.old_per_slice, old_builds)
    if args.profile:
        profile(kernels, args.profile)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    bandwidth = copy_bandwidth(torch.device("cuda"))
    date = time.strftime("%Y-%m-%d")
    log(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, {date}, torch {torch.__version__}")
    result = {"device": torch.cuda.get_device_name(), "date": date, "copy_bandwidth_TBps": bandwidth / 1e12,
              "variants": {n: variant(n) for n in names if known(n)}, "caps_blocks_per_sm": CAPS}
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",") if c]
    result["kernels"] = kernel_table(kernels, cases, bandwidth, log)

    def save(steps=None):
        if steps is not None:
            result["steps"] = steps
        (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
        (out / f"{args.tag}.txt").write_text("\n".join(lines) + "\n")

    save()
    if args.steps:
        step_table(kernels, [(c.split(":")[0], int(c.split(":")[1])) for c in args.steps.split(",")], log, save,
                   step_names, args.step_repeats, args.op_times)


if __name__ == "__main__":
    main()
