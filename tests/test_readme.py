"""The README's two commands are the ones CI and users run; its examples and links work against what they make."""

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


def _code(lang: str) -> str:
    return "\n".join(re.findall(rf"```{lang}\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S))


def test_api_examples_name_a_model_the_first_command_serves():
    main, _ = _commands()
    serve = main.split("-m serve ", 1)[1].split("&", 1)[0]
    served = set()
    for spec in re.findall(r"--model (\S+)", serve):
        name, _, path = spec.rpartition("=")
        served.add(name or Path(path).stem)  # NAME=PATH, or PATH served under its file's stem
    assert served == {"quickstart-q8_0"}, served
    used = re.findall(r'"model":\s*"([^"]+)"', _code("bash")) + re.findall(r'model="([^"]+)"', _code("python"))
    assert len(used) >= 5 and set(used) <= served, used


def test_every_relative_link_resolves():
    links = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    local = [u.split("#")[0] for u in links if not re.match(r"[a-z]+:|#", u)]
    assert local and [u for u in local if not (ROOT / u).exists()] == []


def test_gguf_paths_belong_to_runs_the_readme_makes():
    from export.pipeline import model_name
    text = (ROOT / "README.md").read_text()
    paths = re.findall(r"runs/([\w.-]+)/export/([\w.-]+)\.gguf", text)
    assert paths
    for run, stem in paths:
        assert f"--run-dir runs/{run}" in text and f"export all --run runs/{run}" in text, run
        # the GGUF's stem is the model's name: --name where the README's export of that run gives one
        named = re.findall(rf"export all --run runs/{re.escape(run)}\b[^\n]*--name ([\w.-]+)", text)
        names = set(named) or {model_name(Path("runs") / run)}
        assert any(stem.startswith(n + "-") for n in names), (run, stem, names)
