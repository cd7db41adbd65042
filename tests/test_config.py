"""Config files: the upward search, warnings for unknown keys and a misplaced table,
one-line errors for broken TOML; use_backend under out-of-order exits and generators."""

import contextvars
import warnings

import pytest

import stabilize
from stabilize import config


def test_config_is_found_in_a_parent_directory_up_to_the_project_root(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "src" / "pkg").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.stabilize]\nbackend = "numpy"\n')
    monkeypatch.chdir(project / "src" / "pkg")
    name, source = config.resolve_backend_name()
    assert name == "numpy" and source == f"{(project / 'pyproject.toml').resolve()} [tool.stabilize]"
    # A stabilize.toml nearer the working directory wins over the project's pyproject.
    (project / "src" / "stabilize.toml").write_text('backend = "tensorflow"\n')
    assert config.resolve_backend_name() == ("tensorflow", str((project / "src" / "stabilize.toml").resolve()))


def test_search_stops_at_the_project_root(tmp_path, monkeypatch):
    (tmp_path / "stabilize.toml").write_text('backend = "numpy"\n')  # above the project: not read
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    monkeypatch.chdir(project)
    assert config.resolve_backend_name() == ("torch", "default")


def test_unknown_key_warns_once_and_names_the_known_keys(tmp_path):
    (tmp_path / "stabilize.toml").write_text('backend = "numpy"\nbakend = "tf"\n')
    with pytest.warns(UserWarning, match=r"unknown key\(s\) 'bakend' ignored; known keys: backend, device"):
        assert config.resolve_backend_name()[0] == "numpy"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config.resolve_backend_name()  # the same file again: no second warning


def test_a_stabilize_table_in_pyproject_is_reported(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[stabilize]\nbackend = "numpy"\n')
    with pytest.warns(UserWarning, match=r"has a \[stabilize\] table, which is ignored; rename it \[tool.stabilize\]"):
        assert config.resolve_backend_name() == ("torch", "default")


def test_broken_toml_is_a_one_line_config_error(tmp_path):
    (tmp_path / "stabilize.toml").write_text("backend = \n")
    with pytest.raises(stabilize.ConfigError) as info:
        config.resolve_backend_name()
    message = str(info.value)
    assert "\n" not in message and "stabilize.toml is not valid TOML" in message and "fix or remove it" in message
    assert info.value.__cause__ is None


def test_use_backend_out_of_order_exits_leave_nothing_behind():
    outer, inner = stabilize.use_backend("numpy"), stabilize.use_backend("tensorflow")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the outer block first
    assert config.resolve_backend_name() == ("tensorflow", "use_backend()")
    inner.__exit__(None, None, None)
    assert config.resolve_backend_name() == ("torch", "default")


def _gen():
    with stabilize.use_backend("numpy"):
        yield config.resolve_backend_name()[0]
        yield config.resolve_backend_name()[0]


def test_use_backend_in_a_generator_is_documented_and_the_workaround_isolates_it():
    # Documented (use_backend's docstring): context variables do not follow generators.
    gen = _gen()
    assert next(gen) == "numpy"
    assert config.resolve_backend_name()[0] == "numpy"  # the caller sees it while suspended
    gen.close()
    assert config.resolve_backend_name() == ("torch", "default")  # and nothing is left once it ends
    # The documented workaround: drive the generator in its own context.
    ctx, gen = contextvars.copy_context(), _gen()
    assert ctx.run(next, gen) == "numpy"
    assert config.resolve_backend_name() == ("torch", "default")
    assert ctx.run(next, gen) == "numpy"
    ctx.run(gen.close)
    assert config.resolve_backend_name() == ("torch", "default")
