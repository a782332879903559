import tomllib
from pathlib import Path

import pytest

from aegis.config import ConfigError, build, load, to_toml
from aegis.schedule import PHI

ROOT = Path(__file__).resolve().parents[1]


def test_borea_config_is_the_seed_recipe_exactly():
    cfg = load(ROOT / "configs" / "borea_rtx3060.toml")
    assert cfg.model.base == "HODACHI/Borea-Phi-3.5-mini-Instruct-Jp"
    assert cfg.model.quantization == "nf4"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32, "auto")
    s = cfg.schedule
    assert (s.total_steps, s.warmup_steps, s.anneal_steps, s.start_alpha, s.shape) == (500, 50, 400, -5.0, "linear")
    assert s.target_alpha == pytest.approx(PHI, abs=1e-9)
    t = cfg.train
    assert (t.lr, t.batch_size, t.grad_accum, t.max_length, t.save_steps) == (2e-4, 1, 1, 512, 100)


def test_quickstart_has_the_same_recipe_on_the_embedded_model():
    seed, quick = load(ROOT / "configs" / "borea_rtx3060.toml"), load(ROOT / "configs" / "quickstart.toml")
    assert quick.model.base == "embedded"
    for section in ("lora", "soul", "schedule"):
        assert getattr(quick, section) == getattr(seed, section)
    assert (quick.train.lr, quick.train.batch_size, quick.train.max_length, quick.train.save_steps) == (
        seed.train.lr,
        seed.train.batch_size,
        seed.train.max_length,
        seed.train.save_steps,
    )


def test_overrides_parse_toml_values_and_bare_words():
    cfg = build(
        {},
        [
            "train.lr=1e-3",
            "model.quantization=none",
            'lora.target_modules=["qkv_proj"]',
            "schedule.shape=cosine",
            "model.gradient_checkpointing=true",
            "data.train=a.txt,b.jsonl",
        ],
    )
    assert cfg.train.lr == 1e-3 and cfg.model.quantization == "none" and cfg.lora.target_modules == ["qkv_proj"]
    assert cfg.schedule.shape == "cosine" and cfg.model.gradient_checkpointing is True
    assert cfg.data.train == ["a.txt", "b.jsonl"]


def refused(path: Path, text: str, overrides: list[str]) -> ConfigError:
    """The ConfigError of a recipe holding `text`, written at `path`, loaded with `overrides`."""
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(path, overrides)
    return err.value


def test_every_problem_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.toml"
    text = '[model]\nquantization = "int3"\ncolour = "red"\n[lora]\nr = "sixteen"\n'
    text += "[schedule]\ntotal_steps = 10\nwarmup_steps = 8\nanneal_steps = 8\n[extra]\nx = 1\n"
    error = refused(bad, text, ["train.lr=-1", "soul.mix=blend", "nonsense"])
    msg = str(error)
    assert str(bad) in msg
    for fragment in (
        "model.quantization: 'int3'",
        "model.colour: unknown key",
        "lora.r: expected an integer",
        "[extra]: unknown section",
        "train.lr: must be > 0",
        "soul.mix: 'blend'",
        "warmup_steps + anneal_steps (16) exceeds total_steps (10)",
        "expected section.key=value",
    ):
        assert fragment in msg, fragment
    assert len(error.problems) == 8


def test_invalid_toml_names_the_file(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("[model\nbase = 1")
    with pytest.raises(ConfigError, match="(?s)broken.toml: .*not valid TOML.*line 1"):
        load(bad)


def test_resolved_config_round_trips():
    cfg = load(ROOT / "configs" / "quickstart.toml", ["train.seed=7"])
    again = build(tomllib.loads(to_toml(cfg)))
    assert again == cfg


def test_one_problem_is_one_line_naming_file_and_key(tmp_path):
    bad = tmp_path / "one.toml"
    bad.write_text("[train]\nseed = -1\n")
    with pytest.raises(ConfigError) as err:
        load(bad)
    assert str(err.value) == f"{bad}:2: train.seed: must be in [0, 4294967295], got -1"


def test_each_problem_names_the_line_of_its_key_or_its_override(tmp_path):
    bad = tmp_path / "lines.toml"
    text = '# a recipe\n[model]\nbase = "embedded"\nquantization = "int3"\n\n[lora]\nr = 0\n'
    text += "[schedule]\ntotal_steps = 10\nwarmup_steps = 8\nanneal_steps = 8\n[extra]\nx = 1\n"
    assert sorted(str(refused(bad, text, ["train.lr=-1", "nonsense"])).splitlines()) == sorted(
        [
            f"{bad}:4: model.quantization: 'int3' is not one of nf4, none",
            f"{bad}:7: lora.r: must be > 0, got 0",
            f"{bad}:8: schedule: warmup_steps + anneal_steps (16) exceeds total_steps (10)",
            f"{bad}:12: [extra]: unknown section (known: model, lora, soul, schedule, train, data)",
            "--set train.lr: must be > 0, got -1.0",
            "--set 'nonsense': expected section.key=value",
        ]
    )


def test_seeds_numpy_cannot_take_are_refused():
    assert build({}, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
    assert build({}, ["train.seed=0"]).train.seed == 0
    for seed in (-1, 2**32, 2**70):
        with pytest.raises(ConfigError, match=rf"train\.seed: must be in \[0, 4294967295\], got {seed}"):
            build({}, [f"train.seed={seed}"])


def test_a_binary_or_unreadable_config_names_the_file(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[model]\n\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match=r"binary\.toml:2: not UTF-8 text \(byte 0xff at offset 8\)"):
        load(binary)
    with pytest.raises(ConfigError, match=r"cannot be read \(Is a directory\)"):
        load(tmp_path)
