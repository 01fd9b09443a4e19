"""How much code a reader follows to read one script: its own code lines plus those of the common.py definitions
it reaches (as `common.X` or through `from common import X`, then transitively inside common.py), and the same for
the optional neighbours (memplan.py, fsdp.py, longrun.py, synthetic.py, foreign.py) whose definitions the script
names (`memplan.X`, `from memplan import X`).

    python tools/reading_size.py [--write docs/reading_size.md]

A method file's method path: its definitions before `class Args` (the method comes first: masking, heads, queue,
loss, views, model, step) and the common.py definitions they reach.

Code lines: lines that are neither blank, nor comments, nor documentation: docstrings and every other bare string
statement, such as the string under an `Args` field that documents it. Prints a markdown table.
"""
import argparse
import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("mae.py", "mae_ct.py", "mim_refiner.py", "lut.py", "conmim.py", "finetune.py", "eval_knn.py")
METHODS = SCRIPTS[:5]
NEIGHBOURS = ("memplan.py", "fsdp.py", "longrun.py", "synthetic.py", "foreign.py")


def code_lines(source: str) -> set[int]:
    """Line numbers holding code (tokens other than comments, newlines and documentation). Documentation is every
    statement that is a bare string: docstrings, and the string under a dataclass field (an `Args` field's help)."""
    tree = ast.parse(source)
    doc = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            doc.update(range(node.lineno, node.end_lineno + 1))
    lines = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines - doc


def definitions(path: Path) -> dict[str, tuple[int, set[str]]]:
    """Top-level name -> (its code lines, the bare names it uses)."""
    src = path.read_text()
    code = code_lines(src)
    out = {}
    for node in ast.parse(src).body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        n = len([i for i in code if start <= i <= node.end_lineno])
        used = {x.id for x in ast.walk(node) if isinstance(x, ast.Name)}
        for name in names:
            out[name] = (n, used)
    return out


def named(tree: ast.AST, module: str) -> set[str]:
    """The names of `module` that `tree` uses: `module.X` (also under `import module as m`) and
    `from module import X` (the definition read, whatever it is bound to)."""
    aliases = {a.asname or a.name for x in ast.walk(tree) if isinstance(x, ast.Import) for a in x.names
               if a.name == module}
    out = {x.attr for x in ast.walk(tree) if isinstance(x, ast.Attribute) and isinstance(x.value, ast.Name)
           and x.value.id in aliases}
    out |= {a.name for x in ast.walk(tree) if isinstance(x, ast.ImportFrom) and x.module == module and not x.level
            for a in x.names}
    return out


def reached(tree: ast.AST, module: str, defs: dict) -> set[str]:
    """The definitions of `module` that `tree` names, and those they use in turn (transitively)."""
    todo = named(tree, module) & defs.keys()
    seen = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo |= {u for u in defs[name][1] if u in defs} - seen
    return seen


def sections(path: Path, defs: dict, reached_by: set[str]) -> list[str]:
    """Markdown rows: each `# N. Title` section of common.py with its lines, code lines, and the code lines of its
    definitions that `reached_by` (one script's reach) holds."""
    src = path.read_text()
    lines = src.splitlines()
    code = code_lines(src)
    heads = [(i + 1, m.group(1), m.group(2)) for i, line in enumerate(lines)
             if (m := re.match(r"^# (\d+b?)\. (.*?)(?: -+)?$", line))]
    starts = {}
    for node in ast.parse(src).body:
        for name in defs:
            if getattr(node, "name", None) == name or name in [getattr(t, "id", None) for t in
                                                               getattr(node, "targets", [getattr(node, "target", None)])]:
                starts[name] = node.lineno
    rows = []
    for j, (start, num, title) in enumerate(heads):
        end = heads[j + 1][0] - 1 if j + 1 < len(heads) else len(lines)
        if j == 0:
            start = 1  # the module docstring and imports count with section 1
        n_code = len([i for i in code if start <= i <= end])
        n_reach = sum(defs[n][0] for n in reached_by if start <= starts.get(n, 0) <= end)
        rows.append(f"| {num}. {title.split(':')[0][:60]} | {end - start + 1} | {n_code} | {n_reach} |")
    return rows


def method_path(src: str, common: dict) -> int:
    """Code lines of the definitions above `class Args` and of the common.py definitions they reach."""
    tree = ast.parse(src)
    end = next(n.lineno for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    method = [n for n in tree.body if n.lineno < end and not isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr))]
    start = min(n.lineno for n in method)
    own = len([i for i in code_lines(src) if start <= i < end])
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]  # how `common` is named
    return own + sum(common[n][0] for n in reached(ast.Module(body=imports + method, type_ignores=[]), "common", common))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="also write the table to this markdown file")
    a = ap.parse_args()
    common = definitions(ROOT / "common.py")
    neighbours = {n: definitions(ROOT / n) for n in NEIGHBOURS}
    total = len(code_lines((ROOT / "common.py").read_text()))
    rows = ["| script | own code lines | common.py definitions reached | their code lines | file + common.py | "
            "+ neighbours (definitions, code lines) | method path |", "|---|---|---|---|---|---|---|"]
    for script in SCRIPTS:
        src = (ROOT / script).read_text()
        tree = ast.parse(src)
        own = len(code_lines(src))
        names = reached(tree, "common", common)
        # a neighbour's definitions used by the script, and the common.py ones they reach in turn
        extra_defs = extra_lines = 0
        for n, defs in neighbours.items():
            used = reached(tree, n[:-3], defs)
            extra_defs += len(used)
            extra_lines += sum(defs[u][0] for u in used)
        lines = sum(common[n][0] for n in names)
        rows.append(f"| {script} | {own} | {len(names)} of {len(common)} | {lines} | {own + lines} | "
                    f"{extra_defs}, {extra_lines} | {method_path(src, common) if script in METHODS else ''} |")
    refiner = reached(ast.parse((ROOT / "mim_refiner.py").read_text()), "common", common)
    rows += ["", "common.py by section (the module docstring and imports count with section 1):", "",
             "| section | lines | code lines | code lines mim_refiner.py reaches |", "|---|---|---|---|",
             *sections(ROOT / "common.py", common, refiner)]
    text = (f"common.py: {total} code lines, {len(common)} top-level definitions "
            f"({sum(len((ROOT / n).read_text().splitlines()) for n in NEIGHBOURS)} lines in the neighbours "
            f"{', '.join(NEIGHBOURS)}).\n\n" + "\n".join(rows) + "\n")
    print(text)
    if a.write:
        a.write.write_text("# Reading size: what a reader of one script follows\n\nWritten by "
                           "`python tools/reading_size.py --write docs/reading_size.md`.\n\n" + text)


if __name__ == "__main__":
    main()
