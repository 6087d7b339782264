"""A few plain launches of aim_cfg_sample (official settings, normal bf16 logits, vocabulary 16384, next input d 768,
no mixed_out): the launch scripts/sampler_bench.py times, outside a graph, as an ncu target.

    ncu --section SourceCounters --section InstructionStats --launch-skip 4 --launch-count 1 \
        --kernel-name aim_cfg_sample -o prof python scripts/sampler_launch.py 16
    ncu -i prof.ncu-rep --page source --csv --print-source sass | gzip > src.csv.gz
    python scripts/ncu_source_lines.py src.csv.gz <the step cache's sampler cubin> plugins/aim_kernels.cu 16
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_sampling_kernel import random_logits  # noqa: E402

from aim_rt.plugins.kernels import Kernels, SampleParams  # noqa: E402
from aim_rt.sampling import SamplingSettings  # noqa: E402


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    kernels = Kernels("bfloat16")
    vocab, d, s = 16384, 768, SamplingSettings()
    g = torch.Generator(device="cuda").manual_seed(batch)
    logits = random_logits("normal", 2 * batch, vocab, g).to(torch.bfloat16)
    seeds = torch.arange(batch, device="cuda")
    step = torch.zeros(1, device="cuda", dtype=torch.int32)
    tokens = torch.zeros(batch, 8, device="cuda", dtype=torch.long)
    word = torch.randn(vocab, d, device="cuda").to(torch.bfloat16)
    pos = torch.randn(10, d, device="cuda").to(torch.bfloat16)
    nxt = torch.zeros(2 * batch, d, device="cuda", dtype=torch.bfloat16)
    p = SampleParams(logits=logits.data_ptr(), logits_stride=logits.stride(0), batch=batch, vocab=vocab,
                     uncond_rows=batch, cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k,
                     top_p=s.top_p, seeds=seeds.data_ptr(), step=step.data_ptr(), position_offset=1,
                     tokens=tokens.data_ptr(), num_tokens=8, teacher=None, mixed_out=None, word_emb=word.data_ptr(),
                     pos_emb=pos.data_ptr(), d=d, next_input=nxt.data_ptr(), next_token=None)
    for _ in range(6):
        kernels.cfg_sample(p, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    print("tokens", tokens[:, 0].tolist()[:4])


if __name__ == "__main__":
    main()
