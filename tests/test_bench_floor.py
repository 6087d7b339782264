"""The bandwidth floor `aim-rt bench` divides by reproduces the project's published floors (below)."""

import pytest

import aim_rt
from aim_rt.bench import step_bytes

# (preset, batch) → floor in µs per step at 4.3 TB/s, bf16: weights read once, states read and written once
DOC = {("AiM-B", 1): 57, ("AiM-B", 16): 194, ("AiM-B", 64): 630, ("AiM-L", 1): 179, ("AiM-L", 16): 543,
       ("AiM-L", 64): 1710, ("AiM-XL", 1): 375, ("AiM-XL", 16): 920, ("AiM-XL", 64): 2660}


@pytest.mark.parametrize("preset, batch", list(DOC))
def test_floor_matches_the_performance_doc(preset, batch):
    micros = step_bytes(aim_rt.preset(preset), batch, elem_bytes=2) / 4.3e12 * 1e6
    assert micros == pytest.approx(DOC[preset, batch], rel=0.03)


def test_bench_without_gpu_is_a_clear_error():
    import torch
    from typer.testing import CliRunner

    from aim_rt.cli import app

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = CliRunner().invoke(app, ["bench"])
    assert res.exit_code == 2 and "no CUDA GPU" in " ".join(res.output.split())


@pytest.mark.parametrize("kind, launches, num_tokens, expected", [
    ("in_proj", 24, 256, 20),     # 480 launches already: the 20 passes over every layer stand
    ("in_proj", 48, 256, 20),
    ("lm_head", 1, 256, 200),     # once per step: 200 launches, not 20 (a graph launch's cost would weigh)
    ("final_norm", 1, 256, 200),
    ("residual_norm", 3, 256, 67),  # ceil(200 / 3)
    ("sample", 1, 256, 200),
    ("sample", 1, 64, 63),        # each pass advances the token index: within the position table
])
def test_kernel_table_times_enough_launches(kind, launches, num_tokens, expected):
    from aim_rt.cuda_backend import timing_passes

    passes = timing_passes(kind, launches, reps=20, min_launches=200, num_tokens=num_tokens)
    assert passes == expected
    assert passes * launches >= (200 if kind != "sample" or num_tokens > 200 else num_tokens - 1)


def test_parse_cases_groups_batches_by_model_in_order():
    """The measurement scripts' --cases: model:batch pairs grouped by model, in the order given; a malformed
    case is refused by name."""
    from aim_rt.bench import parse_cases

    assert parse_cases("AiM-XL:4,AiM-B:1,AiM-XL:1") == {"AiM-XL": [4, 1], "AiM-B": [1]}
    for bad in ("AiM-B", "AiM-B:0", ":4", "AiM-B:x"):
        with pytest.raises(ValueError, match="model:batch"):
            parse_cases(bad)


def test_op_bytes_of_a_folded_step_move_the_residual_add_into_out_proj():
    """With the residual add folded into out_proj, the norms after the layers only read the summed residual and
    the out_projs read and write it (and read the gate) instead of writing their output: per launch, norms move
    less and out_projs more, and in bf16 the step's total over those kinds is the same."""
    from aim_rt.bench import op_bytes
    from aim_rt.config import preset

    cfg = preset("AiM-B")
    plain, folded = op_bytes(cfg, 4, 2), op_bytes(cfg, 4, 2, folded=True)
    assert folded["residual_norm"] < plain["residual_norm"] and folded["out_proj"] > plain["out_proj"]
    both = lambda b: cfg.n_layer * (b["residual_norm"] + b["out_proj"]) + b["final_norm"]  # noqa: E731
    assert abs(both(folded) - both(plain)) <= 2 * cfg.n_layer  # (integer averages)
    kinds = ("residual_norm", "out_proj", "final_norm")
    assert {k: v for k, v in folded.items() if k not in kinds} == {k: v for k, v in plain.items() if k not in kinds}


def test_op_bytes_of_a_step_whose_in_proj_norms_its_own_x():
    """With the residual norm folded into in_proj after the first layer, the norm kernel runs once per step (the
    first layer's, whole); the out_projs before those in_projs read gm (4 bytes per element) and write x * gm (2)
    and the tile sums (0.5), which the in_projs read with the shift (2): in bf16, per launch."""
    from aim_rt.bench import op_bytes
    from aim_rt.config import preset

    cfg = preset("AiM-B")
    R, d, L = 8, cfg.d_model, cfg.n_layer
    folded, normed = op_bytes(cfg, 4, 2, folded=True), op_bytes(cfg, 4, 2, folded=True, normed_in=True)
    plain = op_bytes(cfg, 4, 2)
    assert normed["residual_norm"] == plain["residual_norm"]  # the first layer's, whole
    assert abs(L * normed["in_proj"] - (L * folded["in_proj"] + (L - 1) * R * d * 2.5)) < L
    assert abs(L * normed["out_proj"] - (L * folded["out_proj"] + (L - 1) * R * d * 6.5)) < L
    kinds = ("residual_norm", "in_proj", "out_proj")
    assert {k: v for k, v in normed.items() if k not in kinds} == {k: v for k, v in folded.items() if k not in kinds}


def test_compare_steps_alternates_backends_and_compares_their_tokens(capsys):
    """The step-comparison scripts' loop: per batch a warm sample of each backend, then rounds in which the
    backends alternate; each row keeps the least µs per step, every run, and token equality with the first."""
    from aim_rt.bench import compare_steps
    from aim_rt.config import AiMConfig
    from aim_rt.sampling import SamplingSettings

    calls = []

    class Fake:
        def __init__(self, name, us, offset):
            self.name, self.us, self.offset = name, list(us), offset

        def sample(self, classes, seeds, settings):
            calls.append((self.name, "sample", len(classes)))
            return seeds.clone() + self.offset

        def phase_times(self, batch, settings):
            calls.append((self.name, "time", batch))
            return {"replays_us_per_step": self.us.pop(0)}

    model = type("M", (), {"config": AiMConfig(num_classes=10)})()
    backends = {"a": Fake("a", [5.0, 4.0], 0), "b": Fake("b", [3.0, 6.0], 0), "c": Fake("c", [1.0, 2.0], 1)}
    result = {"cases": {}}
    compare_steps("M", model, backends, [2], SamplingSettings(), 2, result)
    row = result["cases"]["M b2"]
    assert row["us_per_step"] == {"a": 4.0, "b": 3.0, "c": 1.0} and row["all"]["b"] == [3.0, 6.0]
    assert row["tokens_equal_first"] == {"b": True, "c": False}
    assert [c[:2] for c in calls] == [("a", "sample"), ("b", "sample"), ("c", "sample")] + [
        (n, "time") for _ in range(2) for n in "abc"]
    assert "M b2: a 4.0, b 3.0, c 1.0 µs per step" in capsys.readouterr().out


def test_in_step_costs_charge_each_kernel_what_it_adds_to_the_step():
    from aim_rt.bench import in_step_costs

    kinds = ["norm", "in_proj", "ssu"]
    # two steps; in_proj starts early (programmatic dependent launch) and ends 2 µs after the norm; the state
    # update ends before in_proj would have let it (adds 0); the step boundary is measured across steps
    spans = [(0, 1), (0.5, 3), (1, 3), (3.5, 4), (3.6, 9), (4, 10)]
    costs = in_step_costs(spans, kinds)
    assert costs == {"norm": pytest.approx(1.0), "in_proj": pytest.approx((2 + 5) / 2), "ssu": pytest.approx(0.5)}
    # what the kinds add sums to the span after the first kernel's end
    assert costs["norm"] * 1 + costs["in_proj"] * 2 + costs["ssu"] * 2 == pytest.approx(10 - 1)
    # the order of the events as given does not matter; spans that are not whole steps give nothing
    assert in_step_costs(spans[::-1], kinds) == costs
    assert in_step_costs(spans[:5], kinds) is None
    assert in_step_costs(spans, []) is None


def test_kernel_table_shows_the_in_step_column_only_where_measured():
    from aim_rt.bench import format_kernel_table

    op = {"op": "in_proj", "launches_per_step": 24, "us_per_launch": 2.0, "us_per_step": 48.0,
          "bytes_per_launch": 5e6, "achieved_GBps": 2500.0, "fraction_of_copy_bandwidth": 0.6}
    row = {"model": "AiM-B", "dtype": "bfloat16", "batch": 1, "step_us_graph": 250.0, "sum_of_ops_us": 48.0,
           "gaps_us": 202.0, "kernels_per_step": 99, "floor_us": 57.0,
           "replay_timeline": {"kernel_us_per_step": 300.0, "idle_us_per_step": 1.0, "span_us_per_step": 240.0},
           "ops": [dict(op, in_step_us_per_step=60.0), dict(op, op="lm_head")]}
    text = format_kernel_table({"device": "GPU", "copy_bandwidth_TBps": 4.2, "date": "2026-12-05", "rows": [row]})
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}
    assert lines["in_proj"].endswith("60.0 (25%)")
    assert lines["lm_head"].endswith("60%")  # no in-step measurement: the column stays empty
