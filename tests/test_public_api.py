import tdiag


def test_public_api_is_stable():
    assert sorted(tdiag.__all__) == ["Finding", "Monitor", "Severity", "TdiagError", "__version__"]
    for name in tdiag.__all__:
        assert getattr(tdiag, name) is not None


def test_cli_version():
    from typer.testing import CliRunner

    from tdiag.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and tdiag.__version__ in result.output
