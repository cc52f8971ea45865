"""Every path, config key, Make target and command-line flag the README names exists.

The checker reads README.md as text: repository paths (`engine/...`, `configs/...`, links into docs/), dotted
config keys (`data.path`, `decode.strength_by_ipc.1`) resolved through DistillConfig's dataclasses, `make <target>`
against the Makefile, and every `--flag` that follows a script (`python jobs/distill.py --until ...`) against that
script's argparse source. No Ray, no network; the scripts are parsed, not run.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from engine.config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Top-level entries of the repository a README path may start with; anything else (runs/, .venv/, s3://) is an
# output or a placeholder, not a file of the project.
REPO_DIRS = ("engine", "jobs", "tune", "benchmarks", "configs", "tests", "docs")
ROOT_FILES = ("Makefile", "cluster.yaml", "requirements.lock", "pyproject.toml", "CHANGELOG.md", "README.md")
SECTIONS = tuple(name for name, hint in typing.get_type_hints(DistillConfig).items() if dataclasses.is_dataclass(hint))

PATH = re.compile(r"(?<![\w./~-])((?:%s)/[\w.\-/]*\w/?)" % "|".join(REPO_DIRS))
ROOT_FILE = re.compile(r"(?<![\w./-])(%s)(?![\w.-])" % "|".join(re.escape(f) for f in ROOT_FILES))
LINK = re.compile(r"\]\(([^)\s]+)\)")
KEY = re.compile(r"(?<![\w./-])((?:%s)\.[a-z_][\w.]*\w)" % "|".join(SECTIONS))
MAKE = re.compile(r"\bmake ([a-z][\w-]*)")
SCRIPT = re.compile(r"(?:jobs|tune|benchmarks)/\w+\.py")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
INLINE_FLAG = re.compile(r"`(--[a-z][\w-]*)`")
MAKE_ARGS = re.compile(r'\bmake \w+ ARGS="([^"]*)"')
OVERRIDE = re.compile(r"(?<![\w./-])([a-z_][\w.]*)=")
OVERRIDE_SCRIPTS = ("jobs/distill.py", "tune/sweep.py", "jobs/train_prior.py")
ADD_ARGUMENT = re.compile(r"""add_argument\(\s*(?:"-\w",\s*)?"(--[\w-]+)\"""")


def resolve_key(dotted: str) -> bool:
    """Whether `section.key[.sub]` names a field of DistillConfig's stage dataclasses (one more part for dict keys),
    or a top-level key such as `runs_dir`."""
    parts = dotted.split(".")
    if len(parts) == 1:
        return parts[0] in typing.get_type_hints(DistillConfig) and parts[0] not in SECTIONS
    if len(parts) < 2 or parts[0] not in SECTIONS:
        return False
    hints = typing.get_type_hints(typing.get_type_hints(DistillConfig)[parts[0]])
    if parts[1] not in hints:
        return False
    rest = parts[2:]
    if not rest:
        return True
    origin = typing.get_origin(hints[parts[1]])
    return origin is dict and len(rest) == 1


def anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def make_targets() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([\w-]+)\s*:", (ROOT / "Makefile").read_text(), re.M)}


def script_flags(script: str) -> set[str]:
    source = (ROOT / script).read_text()
    return set(ADD_ARGUMENT.findall(source)) | {"--help"}


def problems(text: str) -> list[str]:
    """Everything `text` names that does not exist: paths, links, config keys, Make targets, script flags."""
    found = []
    for path in PATH.findall(text):
        if not (ROOT / path).exists():
            found.append(f"path {path}")
    for name in ROOT_FILE.findall(text):
        if not (ROOT / name).exists():
            found.append(f"file {name}")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        file, _, anchor = target.partition("#")
        if not (ROOT / file).exists():
            found.append(f"link {target}")
        elif anchor and anchor not in anchors(ROOT / file):
            found.append(f"anchor {target}")
    for key in KEY.findall(text):
        key = key.split("=")[0]
        if not resolve_key(key):
            found.append(f"config key {key}")
    targets = make_targets()
    for target in MAKE.findall(text):
        if target not in targets:
            found.append(f"make target {target}")
    for script, arguments in script_calls(text):
        if not (ROOT / script).exists():
            continue  # reported as a path
        known = script_flags(script)
        for flag in FLAG.findall(arguments):
            if flag not in known:
                found.append(f"flag {flag} of {script}")
        if script in OVERRIDE_SCRIPTS:
            found += [f"config key {key}" for key in OVERRIDE.findall(arguments) if not resolve_key(key)]
    for arguments in MAKE_ARGS.findall(text):
        found += [f"config key {key}" for key in OVERRIDE.findall(arguments) if not resolve_key(key)]
    either = script_flags("jobs/distill.py") | script_flags("tune/sweep.py")
    found += [f"flag {flag}" for flag in INLINE_FLAG.findall(text) if flag not in either]
    return found


def script_calls(text: str) -> list[tuple[str, str]]:
    """(script, what follows it up to the next script, inline-code end, table cell or comment), per command line;
    backslash-continued lines are one line."""
    calls = []
    for line in text.replace("\\\n", " ").splitlines():
        matches = list(SCRIPT.finditer(line))
        for match, following in zip(matches, matches[1:] + [None]):
            arguments = line[match.end():following.start() if following else len(line)]
            arguments = re.split(r"`|\||\s#\s|,", arguments)[0]
            calls.append((match.group(0), arguments))
    return calls


def test_everything_the_readme_names_exists():
    assert problems(README.read_text()) == []


def test_the_readme_is_documentation_not_a_log():
    text = README.read_text()
    assert 150 <= len(text.splitlines()) <= 260
    assert "issue #" not in text.lower()
    for stale in ("ray_stages.py", "history.jsonl"):
        assert stale not in text


@pytest.mark.parametrize("text, problem", [
    ("see `engine/no_such_module.py`", "path engine/no_such_module.py"),
    ("[the guide](docs/no_such_page.md)", "link docs/no_such_page.md"),
    ("set `data.no_such_key=3`", "config key data.no_such_key"),
    ("`decode.strength.1=0.7`", "config key decode.strength.1"),
    ("run `make no-such-target`", "make target no-such-target"),
    ("python jobs/distill.py --no-such-flag", "flag --no-such-flag of jobs/distill.py"),
    ("python tune/sweep.py --until quantize", "flag --until of tune/sweep.py"),
    ("python jobs/distill.py run_dir=s3://b/runs", "config key run_dir"),
    ('make distill ARGS="nme=x"', "config key nme"),
    ("`--no-such-flag`", "flag --no-such-flag"),
    ("[nodes](docs/scale.md#no-such-section)", "anchor docs/scale.md#no-such-section"),
])
def test_the_checker_rejects_what_does_not_exist(text, problem):
    assert problem in problems(text)


def test_the_checker_accepts_what_exists():
    text = ("`engine/config.py`, [scale](docs/scale.md#several-nodes), `decode.strength_by_ipc.1=0.7`, "
            "`runtime.shared_paths`, make test, python jobs/distill.py --until quantize --overwrite, "
            "python tune/sweep.py --smoke-test --max-concurrent 2, runs/digits/report.html, s3://b/runs, "
            'make distill ARGS="name=x runs_dir=s3://b/r data.path=/d", python jobs/distill.py cache_dir=/c, `--overwrite`')
    assert problems(text) == []


def link_problems(markdown: Path) -> list[str]:
    """Relative links of a Markdown file (resolved from its folder) whose file or heading anchor does not exist."""
    found = []
    for target in LINK.findall(markdown.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (markdown.parent / file) if file else markdown
        if not path.exists():
            found.append(f"link {target}")
        elif anchor and anchor not in anchors(path):
            found.append(f"anchor {target}")
    return found


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_the_links_of_each_docs_page_resolve(page):
    assert link_problems(ROOT / "docs" / page) == []


def test_the_link_checker_rejects_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[here](#title) [there](#nowhere) [gone](other.md)\n")
    assert link_problems(page) == ["anchor #nowhere", "link other.md"]
