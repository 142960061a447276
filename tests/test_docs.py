"""The README and docs/ against the code: links, "DESIGN §" citations, the config reference, commands.

- every relative link (and its #anchor) in README.md and docs/*.md resolves;
- every "DESIGN §N" cited anywhere in the repository is a section of docs/design.md;
- docs/config.md equals what tools/config_reference.py generates from the settings;
- every command in a code block of these pages is checked: a `python` command parses with its
  script's own arguments and its config and `--set` keys validate (the cheap ones also run:
  test_the_cheap_commands_run), a `python -m pytest` command names tests that exist, and a
  command no test can run (Colab, a GPU, the Hub, a viewer) says so on its page.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_RUN = "not run by the tests"     # what a page says next to a command no test can run


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --------------------------------------------------------------------------- #
# Reading the pages
# --------------------------------------------------------------------------- #

def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6} (.+)$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def code_blocks(path: Path) -> list[tuple[int, str, list[str], str]]:
    """(line of the opening fence, language, the block's lines, the prose around it) of each block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, start, body, language = [], None, [], ""
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            if start is None:
                start, body, language = number, [], line.strip()[3:]
            else:
                before = "\n".join(lines[max(0, start - 8):start - 1] + lines[number:number + 4])
                blocks.append((start, language, body, before))
                start = None
        elif start is not None:
            body.append(line)
    return blocks


def commands(path: Path) -> list[tuple[int, str, str]]:
    """(line, command, where it is explained) of every command in the page's bash and python blocks.

    Continuation lines are joined, comments dropped, `&&` chains split, a notebook cell's leading
    `!` dropped; `where` is the prose around the block and the block itself, comments included."""
    out = []
    for start, language, body, before in code_blocks(path):
        if language not in ("bash", "sh", "python"):
            continue
        joined, first = "", None
        for offset, line in enumerate(body, 1):
            first = first or start + offset
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            text, number, joined, first = (joined + line).strip(), first, "", None
            if not text or text.startswith("#"):
                continue
            words = shlex.split(text.lstrip("!"), comments=True)
            where = f"{before}\n" + "\n".join(body)
            while words:
                part = words[:words.index("&&")] if "&&" in words else words
                words = words[len(part) + 1:]
                out.append((number, shlex.join(part), where))
    return out


def argv_of(command: str) -> tuple[str, list[str]] | None:
    """(script, its arguments) of a `python X.py ...` / `torchrun ... X.py ...` command, else None."""
    words = shlex.split(command)
    while words and (re.match(r"^[A-Z_]+=", words[0]) or words[0] == "nice"):   # env, nice -n N
        words = words[3:] if words[0] == "nice" else words[1:]
    if not words or words[0] not in ("python", "torchrun") or words[1:2] == ["-m"]:
        return None
    script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    if script is None:
        return None
    return words[script], words[script + 1:]


ALL_COMMANDS = [(page, line, cmd, where) for page in PAGES for line, cmd, where in commands(page)]


def command_id(item) -> str:
    page, line, cmd, _ = item
    return f"{rel(page)}:{line}"


# --------------------------------------------------------------------------- #
# Links and citations
# --------------------------------------------------------------------------- #

def test_every_relative_link_resolves():
    checked, broken = 0, []
    for page in PAGES:
        for number, line in prose_lines(page.read_text(encoding="utf-8")):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"^[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                checked += 1
                if not dest.exists():
                    broken.append(f"{rel(page)}:{number}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{rel(page)}:{number}: {target} (no heading #{anchor} in {rel(dest)})")
    assert checked > 50
    assert not broken, "\n".join(broken)


def test_slug_follows_githubs_rule():
    assert slug("§9 Tests: what is asserted") == "9-tests-what-is-asserted"
    assert slug("From a real `local.yaml` run") == "from-a-real-localyaml-run"
    assert slug("The grid (six strategies × 3 seeds) and the domain shift (three × 3)") == \
        "the-grid-six-strategies--3-seeds-and-the-domain-shift-three--3"


def design_citations() -> dict[str, list[str]]:
    """{section number: [file:line, ...]} of every "DESIGN §N" / "DESIGN section N" in the repository."""
    found: dict[str, list[str]] = {}
    for path in REPO.rglob("*"):
        if (".git" in path.parts or not path.is_file() or path.suffix not in (".py", ".md", ".ipynb", ".yaml", ".txt")
                or path == Path(__file__).resolve()):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for section in re.findall(r"DESIGN (?:§|section )(\d+)", line):
                found.setdefault(section, []).append(f"{rel(path)}:{number}")
    return found


def test_every_design_citation_is_a_section_of_docs_design():
    cited = design_citations()
    assert {"4", "6", "8", "9"} <= set(cited)          # the citations in code and tests today
    text = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## §(\d+) ", text, flags=re.M))
    missing = {n: where for n, where in cited.items() if n not in sections}
    assert not missing, f"cited but not a '## §N' heading of docs/design.md: {missing}"


# --------------------------------------------------------------------------- #
# The generated config reference
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def rendered() -> str:
    from tools import config_reference
    return config_reference.render()


def test_config_reference_matches_the_code(rendered):
    page = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert page == rendered, "docs/config.md is out of date: run python tools/config_reference.py --write"


def test_config_reference_lists_every_setting_with_its_default_and_bounds(rendered):
    from dataclasses import fields, is_dataclass
    import typing
    from nemoe.config import Config

    keys = []
    def walk(cls, prefix):
        for f in fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                keys.append(f"{prefix}{f.name}")
    walk(Config, "")
    rows = {line.split("|")[1].strip().strip("`"): line for line in rendered.splitlines() if line.startswith("| `")}
    assert set(keys) <= set(rows), set(keys) - set(rows)
    assert "| `train.lr` | `0.0002` | float, > 0 |  | Peak learning rate (AdamW). |" in rows["train.lr"]
    assert "| refused |" in rows["moe.top_k"] and "`1` \\| `2`" in rows["moe.top_k"]
    assert "(derived from `train.seed`)" in rows["plasticity.experts.seed"]


def test_config_reference_check_flags_a_stale_page_and_write_mends_it(rendered, tmp_path, monkeypatch, capsys):
    from tools import config_reference
    stale = tmp_path / "config.md"
    stale.write_text(rendered.replace("Peak learning rate", "Peak rate"), encoding="utf-8")
    monkeypatch.setattr(config_reference, "PAGE", stale)
    monkeypatch.setattr(config_reference, "REPO", tmp_path)
    monkeypatch.setattr(config_reference, "render", lambda: rendered)
    assert config_reference.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert config_reference.main(["--write"]) == 0
    assert stale.read_text(encoding="utf-8") == rendered
    assert config_reference.main(["--check"]) == 0


# --------------------------------------------------------------------------- #
# Commands
# --------------------------------------------------------------------------- #

def needs_what_tests_lack(command: str) -> str | None:
    """Why no test can run this command (Colab, a GPU, the Hub, a viewer), else None."""
    words = command.split()
    if words[0] in ("pip", "git", "tensorboard", "%load_ext", "%tensorboard", "cp", "cd") or "drive." in command:
        return {"pip": "it installs packages", "git": "it clones from the network", "cd": "shell",
                "cp": "it copies a finished study's figures"}.get(words[0], "Colab or a viewer")
    if "--device cuda" in command or "torchrun" in command and "local.yaml" not in command:
        return "a GPU"
    if re.search(r"gpu_check\.py(?!.*--device cpu)", command):
        return "a GPU"
    if re.search(r"--init-from (gpt2|distilgpt2)\b", command) or "t4.yaml" in command and "train_nemoe.py" in command:
        return "the Hugging Face Hub"
    return None


def test_the_pages_have_commands_and_each_is_classified():
    assert len(ALL_COMMANDS) > 60
    kinds = {"python": 0, "other": 0}
    for _, _, cmd, _ in ALL_COMMANDS:
        kinds["python" if argv_of(cmd) or cmd.startswith("python -m pytest") else "other"] += 1
    assert kinds["python"] > 50


@pytest.mark.parametrize("item", [c for c in ALL_COMMANDS if needs_what_tests_lack(c[2])], ids=command_id)
def test_a_command_no_test_can_run_says_so_on_its_page(item):
    page, line, cmd, where = item
    allowed = {"pip install -r requirements.txt": "CI's .ci/run runs it",
               "pip install torch==2.13.0": "CI's .ci/run runs it"}
    if cmd in allowed:
        assert cmd.replace("pip install", "pip install --quiet").split()[-1] in (REPO / ".ci" / "run").read_text()
        return
    assert NOT_RUN in " ".join(where.lower().split()), \
        f"{rel(page)}:{line}: {cmd!r} needs {needs_what_tests_lack(cmd)}; say '{NOT_RUN}' beside it"


def parse(script: str, argv: list[str]):
    """The namespace `script`'s own parser makes of `argv` (SystemExit when it refuses them)."""
    if script == "train_nemoe.py":
        module = importlib.import_module("train_nemoe")
    else:
        assert script.startswith("tools/"), script
        module = importlib.import_module("tools." + Path(script).stem)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return module, module.parse_args(argv)
        except SystemExit as exit_:
            raise AssertionError(f"{script} refused {argv}: {err.getvalue().strip()}") from exit_


PYTHON_COMMANDS = [c for c in ALL_COMMANDS if argv_of(c[2])]


@pytest.mark.parametrize("item", PYTHON_COMMANDS, ids=command_id)
def test_a_python_command_parses_and_its_config_validates(item, monkeypatch):
    """The script's own parser accepts the arguments; the config and every --set validate."""
    page, line, cmd, _ = item
    script, argv = argv_of(cmd)
    monkeypatch.chdir(REPO)
    assert (REPO / script).is_file(), f"{rel(page)}:{line}: no {script}"
    module, args = parse(script, argv)
    from nemoe.config import load_config
    if script == "train_nemoe.py":
        if args.init_from is not None:   # the model's shape comes from the source (see test_pretrained.py)
            return
        load_config(args.config, module.overrides_of(args))
    elif getattr(args, "overrides", None) or isinstance(getattr(args, "config", None), str):
        if getattr(args, "config", None):
            load_config(args.config, args.overrides)
    for name in getattr(args, "flops", None) and args.flops.split(",") or []:
        load_config(name)


@pytest.mark.parametrize("item", [c for c in ALL_COMMANDS if c[2].startswith("python -m pytest")], ids=command_id)
def test_a_pytest_command_names_tests_that_exist(item):
    page, line, cmd, _ = item
    words = shlex.split(cmd)[3:]
    files = [w for w in words if w.startswith("tests/")]
    assert all((REPO / f.split("::")[0]).is_file() for f in files), f"{rel(page)}:{line}: {files}"
    if "-k" in words:
        names = re.findall(r"^def (test_\w+)", "".join((REPO / f).read_text() for f in files), flags=re.M)
        pattern = words[words.index("-k") + 1]
        assert any(pattern in name for name in names), f"{rel(page)}:{line}: -k {pattern} selects nothing"
    if "-m" in words:
        assert words[words.index("-m") + 1] in ("slow", "not slow")


def test_the_cheap_commands_run(monkeypatch, capsys):
    """The documented commands that read only committed files run here as written."""
    monkeypatch.chdir(REPO)
    documented = {cmd for _, _, cmd, _ in ALL_COMMANDS}
    plan = "python tools/compare.py --plan --from studies/gate_bytes_mix --effect 0.02"
    assert plan in documented
    from tools import compare
    assert compare.main(shlex.split(plan)[2:]) in (0, None)
    out = capsys.readouterr().out
    assert "static_max" in out and "seeds" in out

    check = "python tools/config_reference.py --check"
    assert check in documented and "python tools/config_reference.py --write" in documented
    from tools import config_reference
    assert config_reference.main(shlex.split(check)[2:]) == 0   # so --write would leave the page as it is


@pytest.mark.parametrize("script", sorted({argv_of(c[2])[0] for c in PYTHON_COMMANDS}))
def test_every_documented_script_answers_help(script, capsys):
    module = importlib.import_module("train_nemoe" if script == "train_nemoe.py" else "tools." + Path(script).stem)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
