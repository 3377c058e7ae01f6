"""Recipe files that are not what they should be: one line naming the file, never a traceback or an exhausted machine.

A recipe that is not UTF-8 text, and one whose YAML aliases expand a kilobyte into billions of values
(``metaloop.cli.schema`` indexes every key of a recipe with its line, and Hydra would copy every value).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from cli_helpers import TINY, cli, cli_error

from metaloop.cli import main

SINE = ["--config", "maml_sinusoid.yaml", *TINY]
LATIN1 = "# caf\xe9 au lait: a recipe saved as Latin-1\ndefaults: [maml_sinusoid, _self_]\n".encode("latin-1")


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """Returns a recipe of under 1 KB whose mapping aliases expand to ``width ** levels`` values (9 ** 9: 387 million)."""
    lines = ["defaults: [maml_sinusoid, _self_]", "l0: &l0 {" + ", ".join(f"k{i}: lol" for i in range(width)) + "}"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} {{" + ", ".join(f"k{i}: *l{level - 1}" for i in range(width)) + "}")
    return "\n".join(lines) + "\n"


def test_a_recipe_that_is_not_utf8_is_named_in_one_line(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(LATIN1)
    message = cli_error("fit", "--config", str(recipe), *TINY)
    assert f"{recipe} is not UTF-8 text (byte 5: invalid continuation byte); save it as UTF-8" in message
    assert len(message.splitlines()) == 1


def test_a_recipe_that_builds_on_a_recipe_that_is_not_utf8_names_that_file(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(LATIN1)
    child = tmp_path / "child.yaml"
    child.write_text("defaults: [latin1, _self_]\n")
    assert f"{tmp_path / 'latin1.yaml'} is not UTF-8 text" in cli_error("fit", "--config", str(child), *TINY)


def test_a_config_group_option_that_is_not_utf8_is_named_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "latin1.yaml").write_bytes(b"# caf\xe9\n_target_: metaloop.lightning.MLP\nsizes: [1, 4, 1]\n")
    monkeypatch.setenv("METALOOP_CONFIG_PATH", str(tmp_path))
    message = cli_error("fit", *SINE, "model=latin1", f"hydra.run.dir={tmp_path / 'run'}")
    assert message == f"metaloop: error: {tmp_path / 'model' / 'latin1.yaml'} is not UTF-8 text (byte 5: invalid continuation byte); save it as UTF-8"


def test_recipes_lists_the_others_and_names_a_file_that_is_not_utf8(tmp_path, monkeypatch, capsys):
    (tmp_path / "latin1.yaml").write_bytes(LATIN1)
    (tmp_path / "mine.yaml").write_text("# my sinusoid recipe\ndefaults: [maml_sinusoid, _self_]\n")
    monkeypatch.setenv("METALOOP_CONFIG_PATH", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    main(["recipes"])
    lines = capsys.readouterr().out.splitlines()
    assert any("mine.yaml" in line and "my sinusoid recipe" in line for line in lines)
    assert any("maml_omniglot.yaml" in line for line in lines)
    [bad] = [line for line in lines if "latin1.yaml" in line]
    assert f"{tmp_path / 'latin1.yaml'} is not UTF-8 text" in bad
    # the readable recipe beside it still runs
    cli("fit", "--config", "mine.yaml", *TINY, f"hydra.run.dir={tmp_path / 'run'}")


def test_a_yaml_alias_bomb_in_a_recipe_is_refused_before_it_expands(tmp_path):
    """Run with 1 GiB of address space above what the imports take: on the old code the key index exhausts it."""
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_alias_bomb())
    assert recipe.stat().st_size < 1024
    capped = textwrap.dedent(f"""
        import resource
        import metaloop.cli, metaloop.cli.folders, metaloop.cli.schema  # the imports, before the cap
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.RLIM_INFINITY))
        metaloop.cli.main(["fit", "--config", {str(recipe)!r}, "hydra.run.dir={tmp_path / 'run'}"])
    """)
    done = subprocess.run([sys.executable, "-c", capped], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip() == (
        f"metaloop: error: {recipe}: its YAML aliases (*name) expand to more than 100,000 values; write the values out, "
        "or use Hydra's ${...} interpolation"
    )
    assert not (tmp_path / "run").exists()


def test_a_recipe_with_a_few_aliases_still_runs(tmp_path):
    recipe = tmp_path / "aliased.yaml"
    recipe.write_text("defaults: [maml_sinusoid, _self_]\ntask: {k_shots: &k 5, k_queries: *k}\n")
    cli("fit", "--config", str(recipe), *TINY, f"hydra.run.dir={tmp_path / 'run'}")
