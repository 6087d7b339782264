"""The one decode loop: what it feeds a decoder, teacher forcing, the mixed-logit record, the request checks,
and the module structure it replaced (no sampler on the model, no import cycle)."""

import ast
from pathlib import Path

import pytest
import torch

import aim_rt
from aim_rt import SamplingError, SamplingSettings, ops
from aim_rt.decoding import ReferenceDecoder, check_request, decode, sample_tokens
from conftest import GOLDEN, TINY

ROOT = Path(__file__).resolve().parents[1]


class RecordingDecoder:
    """Logits that depend on (row, position, last token) only; records every call."""

    mixed_with = None

    def __init__(self, config):
        self.config = config
        self.calls = []

    def _logits(self, rows: int, key: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(key.sum()))
        return torch.randn(rows, self.config.vocab_size, generator=g)

    def prefill(self, classes, prefix, position_offset):
        self.calls.append(("prefill", classes.clone(), None if prefix is None else prefix.clone(), position_offset))
        return self._logits(2 * classes.shape[0], classes), {"fed": 0}

    def step(self, tokens, position, state):
        self.calls.append(("step", tokens.clone(), position))
        return self._logits(2 * tokens.shape[0], tokens * 7 + position), {"fed": state["fed"] + 1}


SETTINGS = SamplingSettings(cfg_scale=2.0, top_k=5, top_p=0.9, temperature=0.8)


@pytest.mark.parametrize("convention, offset", [("official", 1), ("training", 0)])
def test_the_loop_feeds_each_draw_back_at_its_position(convention, offset):
    dec = RecordingDecoder(TINY)
    settings = SamplingSettings(cfg_scale=2.0, top_k=5, top_p=0.9, position_convention=convention)
    tokens = decode(dec, [1, 3], [7, 8], settings)
    assert tokens.shape == (2, TINY.num_tokens) and tokens.dtype == torch.long
    steps = [c for c in dec.calls if c[0] == "step"]
    assert dec.calls[0][0] == "prefill" and dec.calls[0][3] == offset
    assert len(steps) == TINY.num_tokens - 1
    for k, (_, fed, position) in enumerate(steps):
        assert position == k + offset and torch.equal(fed, tokens[:, k])


def test_teacher_tokens_are_fed_and_the_draws_returned_with_every_mixed_row():
    dec = RecordingDecoder(TINY)
    teacher = torch.randint(0, TINY.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    prefix = teacher[:, :2]
    tokens, mixed = decode(dec, [0, 4], [1, 2], SETTINGS, prefix=prefix, teacher=teacher, return_mixed=True)
    assert tokens.shape == (2, 6) and torch.equal(tokens[:, :2], prefix)
    assert mixed.shape == (2, 4, TINY.vocab_size)  # rows predict tokens 2..5
    steps = [c for c in dec.calls if c[0] == "step"]
    assert [int(p) for _, _, p in steps] == [3, 4, 5]
    for k, (_, fed, _) in zip(range(2, 5), steps):
        assert torch.equal(fed, teacher[:, k])
    # row j of `mixed` is ops.cfg_mix of the logits the decoder returned before token 2 + j
    logits, _ = RecordingDecoder(TINY).prefill(torch.tensor([0, 4]), prefix, 1)
    assert torch.equal(mixed[:, 0], ops.cfg_mix(logits[:2], logits[2:], 2.0, 0.8))
    # and the draws are the draws from those rows, whatever was fed
    free = decode(RecordingDecoder(TINY), [0, 4], [1, 2], SETTINGS, prefix=prefix)
    assert torch.equal(tokens[:, 2], free[:, 2])


def test_a_decoder_that_mixes_must_mix_with_the_settings():
    dec = RecordingDecoder(TINY)
    dec.mixed_with = (3.0, 1.0)
    with pytest.raises(SamplingError, match="mixes with"):
        decode(dec, [0], [0], SETTINGS)


@pytest.mark.parametrize("kwargs, match", [
    ({"teacher": torch.zeros(2, TINY.num_tokens + 1, dtype=torch.long)}, "teacher tokens must have"),
    ({"teacher": torch.zeros(3, 4, dtype=torch.long)}, r"teacher must be \(B, m\)"),
    ({"teacher": torch.full((2, 4), TINY.vocab_size)}, "teacher tokens must lie"),
    ({"prefix": torch.zeros(2, 3, dtype=torch.long), "teacher": torch.zeros(2, 3, dtype=torch.long)}, "4..16 columns"),
    ({"prefix": torch.zeros(2, TINY.num_tokens, dtype=torch.long)}, "prefix must be"),
    ({"prefix": -torch.ones(2, 3, dtype=torch.long)}, "prefix tokens must lie"),
])
def test_check_request_refuses_bad_requests(kwargs, match):
    with pytest.raises(SamplingError, match=match):
        check_request(TINY, [0, 1], [0, 1], **kwargs)


def test_check_request_normalises():
    classes, seeds, prefix, teacher = check_request(TINY, (1, 2), torch.tensor([[3], [4]]),
                                                    prefix=torch.zeros(2, 0, dtype=torch.long))
    assert classes.tolist() == [1, 2] and seeds.tolist() == [3, 4] and prefix is None and teacher is None


def test_reference_teacher_forcing_is_sampler_logits():
    model = aim_rt.load_model(GOLDEN / "stage2_group.safetensors")
    tokens = sample_tokens(model, [2, 7], [4, 5], SamplingSettings(cfg_scale=3.0, top_k=20, top_p=0.9))
    drawn, mixed = decode(ReferenceDecoder(model), [2, 7], [4, 5], SamplingSettings(cfg_scale=3.0, top_k=20, top_p=0.9),
                          teacher=tokens, return_mixed=True)
    assert torch.equal(drawn, tokens)  # feeding the model's own draws back is free-running sampling
    assert torch.equal(mixed, aim_rt.sampler_logits(model, [2, 7], tokens, 3.0))


def test_cfg_mix_takes_numbers_and_graph_scalars_alike():
    c, u = torch.randn(3, 11), torch.randn(3, 11)
    ref = (u + (c - u) * 2.5) / 0.7
    assert torch.allclose(ops.cfg_mix(c, u, 2.5, 0.7), ref)
    assert torch.equal(ops.cfg_mix(c, u, torch.tensor(2.5), torch.tensor(0.7)), ops.cfg_mix(c, u, 2.5, 0.7))
    assert torch.equal(ops.cfg_mix(c, u, 2.5), u + (c - u) * 2.5)  # temperature 1: the official mix, exactly


def test_the_model_knows_nothing_of_sampling_or_loading():
    model = aim_rt.random_model(TINY)
    assert not hasattr(model, "sampler_logits") and not hasattr(model, "checkpoint")
    imported = _module_level_imports(ROOT / "aim_rt" / "model.py")
    assert not imported & {"sampling", "decoding", "loading", "checkpoint", "backends"}, imported


def _module_level_imports(path: Path) -> set[str]:
    """aim_rt modules a file imports at module level (relative or absolute), type-checking imports included."""
    out = set()
    body = ast.parse(path.read_text()).body
    nodes = body + [n for top in body if isinstance(top, ast.If) for n in top.body]
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(a.name for a in node.names)
            elif node.module == "aim_rt":
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("aim_rt."):
                out.add(node.module.split(".")[1])
    return out


def test_aim_rt_modules_import_without_cycles():
    modules = {p.stem: _module_level_imports(p) for p in (ROOT / "aim_rt").glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [name])}")
        if state.get(name) == 2 or name not in modules:
            return
        state[name] = 1
        for dep in modules[name]:
            visit(dep, path + [name])
        state[name] = 2

    for name in modules:
        visit(name, [])


def test_no_reference_to_files_outside_the_repository():
    suffixes = {".py", ".md", ".toml", ".cu"}
    offenders = []
    for path in ROOT.rglob("*"):
        if path.suffix in suffixes and not {".venv", ".git"} & set(path.parts) and path.name != Path(__file__).name:
            text = path.read_text(errors="ignore")
            offenders += [str(path.relative_to(ROOT)) for word in ("AIM_SEMANTICS", "shared/") if word in text]
    assert not offenders, offenders
