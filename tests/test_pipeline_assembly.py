"""Pipeline assembly: stage resolution, option checking and order validation (no I/O)."""

import textwrap
from pathlib import Path

import pytest

from router.core.pipeline import (BUILTIN_STAGES, EXCHANGE_ARTIFACTS, PipelineError, build_pipeline, load_pipeline,
                                  resolve_stage)

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
        # the order that persisted nothing at run time: persist_session needs the turn session_reply commits
        (["session_request", "chat_template", "session_generate", "forward", "chat_parse", "persist_session",
          "session_reply"], {}, "stages[5] (persist_session): requires committed_turn"),
        (["session_request", "session_generate", "forward"], {}, "stages[1] (session_generate): requires "
                                                                 "session_prompt"),
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


def _scratch_keys_used(cls) -> set[str]:
    """Every `scratch` key the stage's module reads or writes (`ex.scratch[K]`, `.get/.pop/.setdefault(K)`),
    with module-level names (TURN, ...) resolved."""
    import ast
    import inspect
    import sys

    mod = sys.modules[cls.__module__]
    keys = set()
    for node in ast.walk(ast.parse(inspect.getsource(mod))):
        target = None
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "scratch":
            target = node.slice
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "pop", "setdefault") and isinstance(node.func.value, ast.Attribute)
              and node.func.value.attr == "scratch" and node.args):
            target = node.args[0]
        if target is None:
            continue
        if isinstance(target, ast.Constant):
            keys.add(target.value)
        elif isinstance(target, ast.Name):
            keys.add(getattr(mod, target.id))
        else:
            raise AssertionError(f"{cls.__module__}: a scratch key that is not a constant: {ast.dump(target)}")
    return keys


def _writes_upstream_body(cls) -> bool:
    import inspect
    import sys

    return "ex.upstream_body =" in inspect.getsource(sys.modules[cls.__module__])


@pytest.mark.parametrize("ref", sorted(BUILTIN_STAGES))
def test_each_stage_declares_exactly_the_scratch_keys_it_uses(ref):
    """The stage contract is what the code does: every scratch key a built-in stage's module touches is one it
    declares (requires / optional / provides), and every declared key is one it touches; an Exchange artifact
    it writes (`upstream_body`) is one it provides."""
    cls = resolve_stage(ref)
    declared = set(cls.requires) | set(cls.optional) | set(cls.provides)
    assert declared - set(EXCHANGE_ARTIFACTS) == _scratch_keys_used(cls), ref
    assert ("upstream_body" in cls.provides) == _writes_upstream_body(cls), ref
    for hook in ("uses_tokenizer", "uses_tree", "uses_store", "evicts_cache"):
        assert isinstance(getattr(cls, hook), bool), (ref, hook)


def test_shipped_pipelines_declare_what_they_need():
    for name in ("radix-cache.toml", "radix-cache-r3.toml", "radix-cache-r3-incremental.toml",
                 "session-chat.toml", "session-chat-r3.toml"):
        load_pipeline(f"pipelines/{name}", ROOT)
    assert [s.ref for s in load_pipeline("session-chat", ROOT).stages][-2:] == ["session_reply", "persist_session"]


GROUPS = {"workers": "WorkerAccess", "trajectories": "TrajectoryAccess"}  # Services' parts with their own protocol


def _members(protocol) -> set[str]:
    return {n for n in dir(protocol) if not n.startswith("_")} | set(protocol.__annotations__)


def _services_used(cls) -> tuple[set[str], set[tuple[str, str]]]:
    """What a stage's module reaches on `self.services` (or a local alias of it): the names, and (part, name) for
    what it uses of a part (`services.workers.take`, or `workers = svc.workers` then `workers.take`)."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[cls.__module__]))

    def is_services(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "services") or \
            (isinstance(node, ast.Name) and node.id == "svc")

    part_aliases = {}  # local name -> the part it holds
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) and is_services(node.value.value) \
                and node.value.attr in GROUPS:
            part_aliases.update({t.id: node.value.attr for t in node.targets if isinstance(t, ast.Name)})
    used, used_of_parts = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = node.value
            if is_services(base):
                used.add(node.attr)
            elif isinstance(base, ast.Attribute) and is_services(base.value) and base.attr in GROUPS:
                used_of_parts.add((base.attr, node.attr))
            elif isinstance(base, ast.Name) and base.id in part_aliases:
                used_of_parts.add((part_aliases[base.id], node.attr))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and node.args and \
                is_services(node.args[0]):
            raise AssertionError(f"{cls.__module__}: getattr on services hides what a stage uses")
    return used, used_of_parts


@pytest.mark.parametrize("ref", sorted(BUILTIN_STAGES))
def test_stages_use_only_the_declared_services(ref):
    import router.core.pipeline as pipeline

    used, used_of_parts = _services_used(resolve_stage(ref))
    assert used <= _members(pipeline.Services), ref
    for part, name in used_of_parts:
        assert name in _members(getattr(pipeline, GROUPS[part])), f"{ref}: services.{part}.{name} is not declared"


def test_the_services_check_sees_what_a_stage_uses():
    used, used_of_parts = _services_used(resolve_stage("forward"))
    assert {"config", "upstream", "metrics", "workers"} <= used
    assert {("workers", "take"), ("workers", "give_back"), ("workers", "pool")} <= used_of_parts
    used, used_of_parts = _services_used(resolve_stage("persist"))
    assert {("trajectories", "store"), ("trajectories", "evict"), ("trajectories", "tree")} <= used_of_parts


async def test_the_runtime_provides_every_service(nursery):
    from harness import make_config
    import router.core.pipeline as pipeline
    from router.net.runtime import Runtime

    rt = Runtime(make_config(), nursery)
    rt.trajectories.tree_if_loaded = object()  # (the tree is built on first use; the name is what matters here)
    for name in _members(pipeline.Services):
        assert hasattr(rt, name), name
    for part, protocol in GROUPS.items():
        assert part in pipeline.Services.__annotations__
        for name in _members(getattr(pipeline, protocol)):
            assert hasattr(getattr(rt, part), name), f"{part}.{name}"
    await rt.aclose()
