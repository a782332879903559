"""The README's two commands are the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands for a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, re.S)


def test_ci_runs_the_readme_test_command():
    main, tests = _commands()
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_main_job_uses_real_commands_and_files():
    main, _ = _commands()
    assert "--config configs/quickstart.toml" in main and (ROOT / "configs" / "quickstart.toml").is_file()
    for module in ("train", "export", "serve", "serve.ui"):
        assert f"-m {module} " in main
        assert (ROOT / module.replace(".", "/")).with_suffix("").exists() or (ROOT / f"{module.replace('.', '/')}.py").exists()
    # the GGUF the serve step names is the one `export all` writes for that run directory
    from export.pipeline import model_name
    assert f"runs/quickstart/export/{model_name(Path('runs/quickstart'))}-q8_0.gguf" in main
