"""Cold start: a new process to its first AiM-B batch (tokens and images), random weights, cuda backend.

    AIM_RT_CACHE=$(mktemp -d) python scripts/cold_start.py     # empty kernel cache: NVRTC compiles
    python scripts/cold_start.py                               # second process: cached cubins
"""

import time

t0 = time.perf_counter()
import torch  # noqa: E402

import aim_rt  # noqa: E402
from aim_rt.bench import _model  # noqa: E402
from aim_rt.cuda_backend import CudaBackend  # noqa: E402

t_import = time.perf_counter() - t0
# as `aim-rt generate --backend cuda` and `aim-rt bench`: the kernels compile while the model is built
model, _ = _model("AiM-B", torch.device("cuda"), "bfloat16", precompile=True)
t_model = time.perf_counter() - t0
backend = CudaBackend(model)
tokens = backend.sample(torch.arange(16), torch.arange(16), aim_rt.SamplingSettings())
images = backend.decode(tokens)
torch.cuda.synchronize()
total = time.perf_counter() - t0
print(f"cold start: imports {t_import:.2f} s, random AiM-B built {t_model:.2f} s, first batch of 16 "
      f"(tokens + images) done at {total:.2f} s")
