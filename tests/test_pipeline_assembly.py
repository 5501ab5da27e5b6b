"""Pipeline assembly: stage resolution, option checking and order validation (no I/O)."""

import textwrap
from pathlib import Path

import pytest

from router.core.pipeline import PipelineError, build_pipeline, load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_pipelines_load():
    for name in ("passthrough.toml", "radix-cache.toml", "radix-cache-r3.toml"):
        spec = load_pipeline(f"pipelines/{name}", ROOT)
        assert sum(s.cls.phase == "forward" for s in spec.stages) == 1
    assert [s.ref for s in load_pipeline("passthrough", ROOT).stages] == ["forward"]


@pytest.mark.parametrize(
    "stages, options, expected",
    [
        (["forward", "insert"], {}, "stages[1] (insert): requires trajectory"),
        (["forward", "capture"], {}, "stages[1] (capture): requires prompt"),
        (["tokenize"], {}, "exactly one forward-phase stage (found 0)"),
        (["forward", "forward"], {}, "exactly one forward-phase stage (found 2)"),
        (["forward", "tokenize"], {}, "stages[1] (tokenize): a request-phase stage cannot come after"),
        (["tokenise", "forward"], {}, "stages[0] (tokenise): unknown stage 'tokenise'"),
        (["nosuch.module:Stage", "forward"], {}, "stages[0] (nosuch.module:Stage): cannot import"),
        (["router.stages.tokenize:Missing", "forward"], {}, "has no stage 'Missing'"),
        (["tokenize", "forward"], {"tokenize": {"bogus": 1}}, "stages[0] (tokenize): bad option"),
        (["forward"], {"capture": {}}, "options.capture: no stage of that name"),
    ],
)
def test_bad_pipelines_name_file_index_problem(stages, options, expected):
    with pytest.raises(PipelineError) as ei:
        build_pipeline("p", "p.toml", stages, options)
    assert expected in str(ei.value) and str(ei.value).startswith("p.toml")


def test_custom_stage_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "mystages.py").write_text(textwrap.dedent('''
        import msgspec
        from router.core.pipeline import Stage

        class Opts(msgspec.Struct, forbid_unknown_fields=True):
            limit: int = 5

        class Cap(Stage):
            name = "cap"
            phase = "request"
            Options = Opts
            async def on_request(self, ex):
                return None
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "p.toml").write_text('stages = ["mystages:Cap", "forward"]\n[options."mystages:Cap"]\nlimit = 7\n')
    spec = load_pipeline("p.toml", tmp_path)
    assert spec.stages[0].options.limit == 7
    (tmp_path / "q.toml").write_text('stages = ["mystages:Cap", "forward"]\n[options.cap]\nlimit = "x"\n')
    with pytest.raises(PipelineError, match=r"q.toml: stages\[0\] \(mystages:Cap\): bad option"):
        load_pipeline("q.toml", tmp_path)


def test_unknown_pipeline_file_key(tmp_path):
    (tmp_path / "p.toml").write_text('stage = ["forward"]\n')
    with pytest.raises(PipelineError, match="p.toml"):
        load_pipeline("p.toml", tmp_path)
