"""Which tests exercise each ComfyUI route and node sdlab serves: writes docs/comfyui-coverage.md.

Routes are read from the application itself (every path served both plainly and under /api, as
ComfyUI serves its routes), nodes from the node registry (what /object_info lists). The tests are
parsed, not run: a route is credited to a test whose code holds a string naming its path (f-strings
and "a" + b concatenations count, a query string or a base URL in front does not matter) and, where
the string is a call's first argument, the call's HTTP method; a node to a test holding its class
name as a string or calling the function it runs. A helper, fixture or module constant holding the
string passes the credit on to the tests that use it (through imports too).

    python scripts/comfyui_coverage.py [--check] [--no-write]

--check exits non-zero, naming them, if a route or node has no test; --no-write leaves the doc alone.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
DOC = ROOT / "docs" / "comfyui-coverage.md"
METHODS = {"get": "GET", "post": "POST", "put": "PUT", "delete": "DELETE", "patch": "PATCH"}
WS_CALLS = {"websocket_connect", "connect", "create_connection", "ws_connect"}

# ComfyUI's KSampler lists (comfy/samplers.py KSampler.SAMPLERS / SCHEDULERS: KSAMPLER_NAMES + ddim,
# uni_pc, uni_pc_bh2), as of the ComfyUI that has sa_solver and exp_heun_2_x0
COMFY_SAMPLERS = (
    "euler euler_cfg_pp euler_ancestral euler_ancestral_cfg_pp heun heunpp2 exp_heun_2_x0 exp_heun_2_x0_sde "
    "dpm_2 dpm_2_ancestral lms dpm_fast dpm_adaptive dpmpp_2s_ancestral dpmpp_2s_ancestral_cfg_pp dpmpp_sde "
    "dpmpp_sde_gpu dpmpp_2m dpmpp_2m_cfg_pp dpmpp_2m_sde dpmpp_2m_sde_gpu dpmpp_2m_sde_heun "
    "dpmpp_2m_sde_heun_gpu dpmpp_3m_sde dpmpp_3m_sde_gpu ddpm lcm ipndm ipndm_v deis res_multistep "
    "res_multistep_cfg_pp res_multistep_ancestral res_multistep_ancestral_cfg_pp gradient_estimation "
    "gradient_estimation_cfg_pp er_sde seeds_2 seeds_3 sa_solver sa_solver_pece ddim uni_pc uni_pc_bh2"
).split()
COMFY_SCHEDULERS = (
    "simple sgm_uniform karras exponential ddim_uniform beta normal linear_quadratic kl_optimal".split()
)

# what issue 14 names: routes as (methods, path) and nodes
ISSUE_ROUTES = {
    "/extensions", "/system_stats", "/users", "/features", "/i18n", "/settings", "/settings/{setting_id}",
    "/userdata", "/userdata/{file:path}", "/userdata/{file:path}/move/{dest:path}", "/v2/userdata", "/jobs",
    "/jobs/{job_id}", "/jobs/cancel", "/jobs/{job_id}/cancel", "/workflow_templates", "/global_subgraphs",
    "/models", "/models/{folder}", "/experiment/models", "/internal/folder_paths",
    "/internal/files/{directory_type}", "/view_metadata/{folder}", "/upload/mask", "/history", "/free", "/ws",
}  # fmt: skip
ISSUE_NODES = set(
    """CheckpointLoaderSimple CheckpointLoader VAELoader LoraLoader LoraLoaderModelOnly CLIPLoader
    DualCLIPLoader UNETLoader CLIPSetLastLayer CLIPTextEncode CLIPTextEncodeSDXL CLIPTextEncodeSDXLRefiner
    ConditioningCombine ConditioningAverage ConditioningConcat ConditioningSetArea
    ConditioningSetAreaPercentage
    ConditioningSetMask ConditioningZeroOut ConditioningSetTimestepRange EmptyLatentImage LatentUpscale
    LatentUpscaleBy LatentComposite LatentBlend LatentFromBatch RepeatLatentBatch SetLatentNoiseMask VAEEncode
    VAEEncodeForInpaint VAEDecode VAEEncodeTiled VAEDecodeTiled KSampler KSamplerAdvanced KSamplerSelect
    BasicScheduler CFGGuider SamplerCustomAdvanced RandomNoise LoadImage LoadImageMask SaveImage PreviewImage
    ImageScale ImageScaleBy ImageInvert ImageBatch ImagePadForOutpaint""".split()
)
NOTES = [
    "- `/experiment/models` and `/internal/folder_paths` name each folder by its kind (`checkpoints`), "
    "not by its path on the server's disk as ComfyUI does; the frontend only lists and groups by them.",
    "- `cfgpp_ud10_ab`, in some published KSampler lists, is not in ComfyUI's "
    "`comfy/k_diffusion/sampling.py` (a fork's sampler), so it is not listed above.",
    "- The parity tests of each sampler are in `tests/test_samplers.py` (k-diffusion, diffusers, or a "
    "transcription of ComfyUI's code).",
]
SHOWN = 6  # tests listed per entry
Credits = dict[str, tuple[bool, bool]]  # test id -> (the route's method seen, the test holds the reference)


@dataclass(frozen=True)
class Holder:
    """A top-level function, method or module-level assignment of a test file."""

    file: str
    name: str
    start: int
    end: int

    @property
    def is_test(self) -> bool:
        return self.name.split(".")[-1].startswith("test_")


@dataclass(frozen=True)
class Hit:
    holder: Holder
    method: str | None  # the HTTP method of the call the string is the first argument of, else None


def served_routes() -> dict[str, set[str]]:
    """ComfyUI's routes of a fresh application: path -> methods, for the paths also served under /api."""
    from starlette.routing import Route, WebSocketRoute

    from sdlab.server.app import create_app
    from sdlab.server.paths import Folders
    from sdlab.server.state import Settings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        app = create_app(Settings(Folders(None, root / "outputs", root / "input", root / "state")))
    routes: dict[str, set[str]] = defaultdict(set)
    for path, route in _flatten(app.routes, ""):
        if isinstance(route, WebSocketRoute):
            routes[path].add("WS")
        elif isinstance(route, Route):
            routes[path] |= (route.methods or set()) - {"HEAD"}
    return {path: methods for path, methods in routes.items() if "/api" + path in routes}


def _flatten(routes: list[Any], prefix: str) -> Iterator[tuple[str, Any]]:
    """(full path, route) of routes, through included routers (FastAPI ≥ 0.120 includes them lazily)."""
    for route in routes:
        context = getattr(route, "include_context", None)
        if context is not None:
            yield from _flatten(route.original_router.routes, prefix + context.prefix)
        elif hasattr(route, "path"):
            yield prefix + route.path, route


def node_runs() -> dict[str, str]:
    """Node class -> the name of the function it runs."""
    from sdlab.server.nodes import NODE_TYPES

    return {name: node.run.__name__ for name, node in NODE_TYPES.items()}


def _text(node: ast.AST) -> str | None:
    """A string expression's text with "{}" for each computed part (f-strings, a + b), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left), _text(node.right)
        if left is not None or right is not None:
            return (left if left is not None else "{}") + (right if right is not None else "{}")
    return None


def _holders(tree: ast.Module, file: str) -> Iterator[tuple[Holder, ast.AST]]:
    """The holders of a test file with their syntax trees (a function's decorators included)."""
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef):
            for sub in stmt.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield _holder(file, f"{stmt.name}.{sub.name}", sub), sub
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield _holder(file, stmt.name, stmt), stmt
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            for target in stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]:
                if isinstance(target, ast.Name):
                    yield _holder(file, target.id, stmt), stmt


def _holder(file: str, name: str, node: ast.stmt) -> Holder:
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return Holder(file, name, start, node.end_lineno or node.lineno)


class TestIndex:
    """The test files parsed: the names each holder references, the names each file imports, and every
    string expression with its holder and the HTTP method of the call it is the first argument of."""

    def __init__(self, folder: Path) -> None:
        self.holders: dict[str, list[Holder]] = {}
        self.imports: dict[str, set[tuple[str, str]]] = {}
        self.refs: dict[Holder, set[str]] = defaultdict(set)
        self.calls: dict[Holder, set[str]] = defaultdict(set)
        self.strings: list[tuple[Hit, str]] = []
        for path in sorted(folder.glob("*.py")):
            tree = ast.parse(path.read_text(), path.name)
            self.imports[path.name] = _imported(tree)
            self.holders[path.name] = []
            for holder, node in _holders(tree, path.name):
                self.holders[path.name].append(holder)
                self._index(holder, node)

    def _index(self, holder: Holder, tree: ast.AST) -> None:
        """Record the holder's references (globals it reads; its arguments where they name fixtures), calls
        and strings."""
        methods, texts, names, local = {}, [], set(), set()  # methods: id(first argument) -> method
        decorators = [ast.unparse(d) for d in getattr(tree, "decorator_list", [])]
        takes_fixtures = holder.is_test or any("fixture" in d for d in decorators)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (names if isinstance(node.ctx, ast.Load) else local).add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                (names if takes_fixtures else local).add(node.arg)
            elif isinstance(node, ast.Call):
                name = _called(node)
                self.calls[holder].add(name)
                if node.args:
                    methods[id(node.args[0])] = METHODS.get(name) or ("WS" if name in WS_CALLS else None)
                if name == "request" and len(node.args) > 1 and isinstance(node.args[0], ast.Constant):
                    methods[id(node.args[1])] = str(node.args[0].value).upper()
            if isinstance(node, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                text = _text(node)
                if text is not None:
                    texts.append((node, text))
        self.refs[holder] |= names - local  # a name the function binds is its own, not a holder's
        self.strings += [(Hit(holder, methods.get(id(node))), text) for node, text in texts]

    def tests_using(self, holder: Holder) -> set[Holder]:
        """The test functions that reach `holder` through helpers, fixtures, constants and imports."""
        found, seen, todo = set(), {holder}, [holder]
        while todo:
            h = todo.pop()
            if h.is_test:
                found.add(h)
                continue
            short = h.name.split(".")[-1]
            for file, holders in self.holders.items():
                visible = file == h.file or h.file == "conftest.py"
                if not visible and (Path(h.file).stem, short) not in self.imports[file]:
                    continue
                for user in holders:
                    if user not in seen and short in self.refs[user]:
                        seen.add(user)
                        todo.append(user)
        return found

    def string_hits(self, matches: Callable[[str], bool]) -> list[tuple[Hit, str]]:
        return [(hit, text) for hit, text in self.strings if matches(text)]


def _imported(tree: ast.Module) -> set[tuple[str, str]]:
    """(module, name) of each `from module import name` (a test file imports another's by its stem)."""
    return {
        (n.module or "", a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
    }


def _called(call: ast.Call) -> str:
    """The called name: f for f(...), g for a.b.g(...)."""
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def route_regex(path: str) -> re.Pattern[str]:
    """A test string naming `path`: {param:path} any text, {param} one segment (or a computed part)."""
    pattern = ""
    for literal, param in re.findall(r"([^{]*)(\{[^}]*\})?", path):
        pattern += re.escape(literal)
        if param:
            pattern += ".+" if param.endswith(":path}") else r"[^/?#]+"
    # a base URL or computed prefix, an optional /api in front; a query string or fragment after
    return re.compile(rf"(?:[a-z]+://[^/]+|\{{\}})?(?:/api)?{pattern}(?:[?#].*)?")


def route_coverage(index: TestIndex, routes: dict[str, set[str]]) -> dict[tuple[str, str], Credits]:
    """(method, path) -> {test id: (a call with that method seen, not only the path; the test itself
    holds the string, not a helper or fixture it uses)}.

    A string several routes match goes to those with the most literal text ("/jobs/cancel" is not
    "/jobs/{job_id}"); one that is no call's first argument goes to each method of its path."""
    regexes = {path: route_regex(path) for path in routes}
    out: dict[tuple[str, str], Credits] = {(m, p): {} for p, ms in routes.items() for m in ms}

    def literal(path: str) -> int:
        return len(re.sub(r"\{[^}]*\}", "", path))

    def matching(text: str) -> list[str]:
        paths = [p for p, r in regexes.items() if r.fullmatch(text)]
        most = max((literal(p) for p in paths), default=0)
        return [p for p in paths if literal(p) == most]

    for hit, text in index.string_hits(lambda text: bool(matching(text))):
        for path in matching(text):
            methods = routes[path] if hit.method is None else {hit.method} & routes[path]
            for method, test in ((m, t) for m in methods for t in index.tests_using(hit.holder)):
                _credit(out[(method, path)], test, hit.method is not None, test == hit.holder)
    return out


def _credit(tests: Credits, test: Holder, explicit: bool, direct: bool) -> None:
    key = f"{test.file}::{test.name}"
    was = tests.get(key, (False, False))
    tests[key] = (was[0] or explicit, was[1] or direct)


def node_coverage(index: TestIndex, runs: dict[str, str]) -> dict[str, Credits]:
    """Node class -> the tests that name it as a string or call the function it runs."""
    out: dict[str, Credits] = {}
    for name, run in runs.items():
        holders = {hit.holder for hit, _ in index.string_hits(lambda s, n=name: s == n)}
        holders |= {h for h, called in index.calls.items() if run in called}
        out[name] = {}
        for holder, test in ((h, t) for h in holders for t in index.tests_using(h)):
            _credit(out[name], test, True, test == holder)
    return out


def _tests(ids: Credits) -> str:
    """The first SHOWN test ids (explicit, then direct ones first), and how many more."""
    ranked = sorted(ids, key=lambda t: (not ids[t][0], not ids[t][1], t))
    shown = ", ".join(f"`{t}`" + ("" if ids[t][0] else "°") for t in ranked[:SHOWN])
    return (
        shown + (f" (+{len(ranked) - SHOWN} more)" if len(ranked) > SHOWN else "") if ranked else "**none**"
    )


def render(routes: dict[tuple[str, str], Credits], nodes: dict[str, Credits]) -> str:
    from sdlab.diffusion.samplers import SAMPLERS
    from sdlab.diffusion.schedule import SCHEDULES
    from sdlab.server.nodes import NODE_TYPES

    lines = [
        "# ComfyUI coverage: routes, nodes, sampler and scheduler names, and their tests",
        "",
        "Written by `python scripts/comfyui_coverage.py` (its docstring says how tests are matched; "
        "`--check` fails on an entry without a test). Tests are `file::function` in `tests/`; ° marks a test "
        "that names the path without a call of that method (a helper or workflow it hands to a client). "
        "Issue 14 marks what the issue lists. Every route is also served under `/api`.",
        "",
        "## Routes",
        "",
        "| Method | Path | Issue 14 | Tests |",
        "| --- | --- | --- | --- |",
    ]
    for method, path in sorted(routes, key=lambda mp: (mp[1], mp[0])):
        issue = "yes" if path in ISSUE_ROUTES else ""
        lines.append(f"| {method} | `{path}` | {issue} | {_tests(routes[(method, path)])} |")
    lines += ["", f"## Nodes ({len(nodes)}, as `/object_info` lists them)", "",
              "| Class | Display name | Issue 14 | Tests |", "| --- | --- | --- | --- |"]  # fmt: skip
    for name in sorted(nodes):
        display = NODE_TYPES[name].display_name or name
        lines.append(
            f"| `{name}` | {display} | {'yes' if name in ISSUE_NODES else ''} | {_tests(nodes[name])} |"
        )
    missing = sorted(ISSUE_NODES - set(nodes))
    lines += ["", "Issue-14 nodes sdlab lacks: " + (", ".join(missing) if missing else "none."), ""]
    lines += ["## KSampler names", "", "| ComfyUI sampler | In sdlab |", "| --- | --- |"]
    lines += [f"| `{n}` | {'yes' if n in SAMPLERS else '**no**'} |" for n in COMFY_SAMPLERS]
    extra = sorted(set(SAMPLERS) - set(COMFY_SAMPLERS))
    lines += ["", "sdlab names ComfyUI lacks: " + (", ".join(extra) if extra else "none."), ""]
    lines += ["| ComfyUI scheduler | In sdlab |", "| --- | --- |"]
    lines += [f"| `{n}` | {'yes' if n in SCHEDULES else '**no**'} |" for n in COMFY_SCHEDULERS]
    lines += ["", "## Notes", "", *NOTES]
    return "\n".join(lines) + "\n"


def coverage() -> tuple[dict[tuple[str, str], Credits], dict[str, Credits]]:
    """The tests of each route and node."""
    index = TestIndex(TESTS)
    return route_coverage(index, served_routes()), node_coverage(index, node_runs())


def bare(routes: dict[tuple[str, str], Credits], nodes: dict[str, Credits]) -> list[str]:
    """The routes ("METHOD path") and nodes without a test."""
    return sorted(
        [f"{m} {p}" for (m, p), t in routes.items() if not t] + [n for n, t in nodes.items() if not t]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a route or node has no test")
    parser.add_argument("--no-write", action="store_true", help=f"leave {DOC.relative_to(ROOT)} as it is")
    args = parser.parse_args()
    routes, nodes = coverage()
    if not args.no_write:
        DOC.write_text(render(routes, nodes))
    missing = bare(routes, nodes)
    if missing:
        print("no test: " + ", ".join(missing), file=sys.stderr)
    return 1 if missing and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
