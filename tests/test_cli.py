from pathlib import Path

from click.testing import CliRunner

from lccompress.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_command_has_help_with_an_example_and_a_readme_entry():
    runner = CliRunner()
    for name, cmd in main.commands.items():
        out = runner.invoke(main, [name, "--help"])
        assert out.exit_code == 0, name
        assert "Example: lccompress " + name in out.output, name
        assert f"`lccompress {name}" in README, name


def test_demo_runs_end_to_end():
    out = CliRunner().invoke(main, ["demo", "--steps", "3"])
    assert out.exit_code == 0, out.output
    assert "reference test error" in out.output and "prune" in out.output
