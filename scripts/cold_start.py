"""Cold start: a new process to its first AiM-B batch (tokens and images), random weights, cuda backend, taking
the steps `aim-rt generate --backend cuda` takes: the model-independent kernels (sampler, VQ decoder) start
compiling first, while torch loads (precompile_early); the step's kernels once the config is known, and cuDNN's
loading, while the model is built (precompile, inside bench._model); CudaBackend and the decoder wait for them.

    AIM_RT_CACHE=$(mktemp -d) python scripts/cold_start.py     # empty kernel cache: NVRTC compiles
    python scripts/cold_start.py                               # second process: cached cubins
    python scripts/cold_start.py --plain                       # no early compiles: a library user's order
    python scripts/cold_start.py --no-cudnn-warmup             # cuDNN loaded at the first decode, not meanwhile
"""

import sys
import time

t0 = time.perf_counter()
early = "--plain" not in sys.argv
if early:
    from aim_rt.plugins.kernels import precompile_early

    precompile_early("bfloat16")
import torch  # noqa: E402

import aim_rt  # noqa: E402
from aim_rt.bench import _model  # noqa: E402
from aim_rt.cuda_backend import CudaBackend  # noqa: E402

t_import = time.perf_counter() - t0
if "--no-cudnn-warmup" in sys.argv:
    import aim_rt.cuda_backend

    aim_rt.cuda_backend.CUDNN_WARMUP = False
model, _ = _model("AiM-B", torch.device("cuda"), "bfloat16", precompile=early)
t_model = time.perf_counter() - t0
backend = CudaBackend(model)
t_kernels = time.perf_counter() - t0
tokens = backend.sample(torch.arange(16), torch.arange(16), aim_rt.SamplingSettings())
torch.cuda.synchronize()
t_tokens = time.perf_counter() - t0
images = backend.decode(tokens)
torch.cuda.synchronize()
total = time.perf_counter() - t0
print(f"cold start{'' if early else ' (--plain)'}: imports {t_import:.2f} s, random AiM-B built {t_model:.2f} s, "
      f"step kernels ready {t_kernels:.2f} s, 16 images' tokens {t_tokens:.2f} s, and images: done at {total:.2f} s")
