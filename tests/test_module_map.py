"""The module map stays true: every module says what it imports, the README's table agrees with
the code, and nothing cites a document a reader of the repository cannot open.

Each module's docstring has an ``Imports:`` paragraph whose first sentence names the agentgate
modules it imports (parenthesised asides are ignored; "nothing" means none). A name is resolved
as ``agentgate.NAME``, else as a sibling in the module's own package; words that name no module
are prose. A package name covers its modules. The README's layout table does the same per row:
the first column names the modules (``x.py``) or packages (``x/``) of the row, the last what
they import from outside the row.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "agentgate"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str) -> set[str]:
    """The agentgate modules ``module`` imports, anywhere in the file (deferred and
    type-checking imports included)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = _package_of(module).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES else base)
    return {name for name in found if name == "agentgate" or name.startswith("agentgate.")}


def _strip_parentheses(text: str) -> str:
    while True:
        stripped = re.sub(r"\([^()]*\)", "", text)
        if stripped == text:
            return text
        text = stripped


def mentioned(text: str, package: str = "agentgate") -> set[str]:
    """The modules a sentence names (see the module docstring)."""
    text = _strip_parentheses(text)
    names: set[str] = set()
    for word in re.findall(r"[A-Za-z_][\w.]*\w|[A-Za-z_]", text):
        word = word.removeprefix("agentgate.")
        for candidate in (
            "agentgate" if word == "agentgate" else f"agentgate.{word}",
            f"{package}.{word}",
        ):
            if candidate in MODULES:
                names.add(candidate)
                break
    return names


def _covers(mention: str, module: str) -> bool:
    return module == mention or (mention != "agentgate" and module.startswith(mention + "."))


def mismatch(said: set[str], actual: set[str]) -> list[str]:
    """What is imported but not said, and what is said but not imported."""
    problems = [
        f"imports {m} (not said)" for m in sorted(actual) if not any(_covers(s, m) for s in said)
    ]
    problems += [
        f"says {s} (not imported)" for s in sorted(said) if not any(_covers(s, m) for m in actual)
    ]
    return problems


def imports_sentence(module: str) -> str | None:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    docstring = ast.get_docstring(tree) or ""
    match = re.search(r"^Imports:(.*?)(?:\n\s*\n|\Z)", docstring, re.S | re.M)
    if match is None:
        return None
    paragraph = " ".join(_strip_parentheses(match.group(1)).split())
    return re.split(r"\.(?:\s|$)", paragraph, maxsplit=1)[0].strip()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_says_what_it_imports(module: str) -> None:
    sentence = imports_sentence(module)
    assert sentence is not None, f"{module}: its docstring has no 'Imports:' paragraph"
    actual = {m for m in imports_of(module) if m != module}
    said = set() if sentence.startswith("nothing") else mentioned(sentence, _package_of(module))
    assert not mismatch(said, actual), f"{module}: Imports: {sentence!r}: {mismatch(said, actual)}"


def _readme_rows() -> list[tuple[str, str]]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| module | owns | imports |") :].split("\n\n", 1)[0]
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    return [(cells[0], cells[-1]) for cells in rows]


def _row_modules(cell: str) -> set[str]:
    modules: set[str] = set()
    for name in re.findall(r"`([\w/.]+)`", cell):
        if name.endswith("/"):
            package = "agentgate." + name.rstrip("/").replace("/", ".")
            modules.update(m for m in MODULES if m == package or m.startswith(package + "."))
        else:
            dotted = "agentgate." + name.removesuffix(".py").replace("/", ".")
            modules.add(dotted.removesuffix(".__init__"))
    return modules


def test_the_readme_table_lists_every_module_once_with_its_imports() -> None:
    listed: dict[str, int] = {}
    problems: list[str] = []
    for names, imports in _readme_rows():
        modules = _row_modules(names)
        unknown = modules - set(MODULES)
        assert not unknown, f"README row {names.strip()}: no such module {sorted(unknown)}"
        for module in modules:
            listed[module] = listed.get(module, 0) + 1
        actual = set().union(*(imports_of(m) for m in modules)) - modules
        said = set() if imports.strip() in ("", "—", "-") else mentioned(imports)
        problems += [f"{names.strip()}: {p}" for p in mismatch(said, actual)]
    missing = sorted(m for m in MODULES if m not in listed)
    twice = sorted(m for m, n in listed.items() if n > 1)
    assert not missing, f"modules missing from the README's table: {missing}"
    assert not twice, f"modules in more than one row of the README's table: {twice}"
    assert not problems, "\n".join(problems)


# Documents kept outside the repository (the maintainers' design notes); a reader cannot open
# them, so code, tests and docs must not send anyone there.
_OUTSIDE = re.compile(r"\bDESIGN\b|DESIGN\.md|PITFALLS|STYLE(?:\.md| \d)|HOMEASSISTANT\.md")
_SCANNED = ("agentgate", "tests", "scripts", "bench", "examples", "docs")


def _text_files() -> list[Path]:
    files = [REPO / "README.md"]
    for top in _SCANNED:
        files += [
            p
            for p in sorted((REPO / top).rglob("*"))
            if p.suffix in (".py", ".md", ".toml", ".yaml")
        ]
    return [p for p in files if p.is_file() and p != Path(__file__).resolve()]


def test_nothing_cites_a_document_outside_the_repository() -> None:
    cited = [
        f"{p.relative_to(REPO)}:{n}: {line.strip()}"
        for p in _text_files()
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if _OUTSIDE.search(line)
    ]
    assert not cited, "\n".join(cited)


def test_every_docs_page_cited_exists() -> None:
    missing = [
        f"{p.relative_to(REPO)}: {page}"
        for p in _text_files()
        for page in sorted(set(re.findall(r"\bdocs/[\w-]+\.md", p.read_text(encoding="utf-8"))))
        if not (REPO / page).is_file()
    ]
    assert not missing, "\n".join(missing)
