"""Rewrites the quoted recipes of docs/clients.md from the programs: after
each `<!-- recipe: FILE NAME -->` line, the fenced block becomes the region
of pgrx_tests/clients/FILE between `recipe: NAME` and `end recipe`.
pgrx_tests/tests/clients.rs (docs_recipes_are_the_tested_code) fails while
they differ. Run: python3 pgrx_tests/clients/update_docs.py"""

import pathlib
import re

HERE = pathlib.Path(__file__).resolve().parent
DOC = HERE.parent.parent / "docs" / "clients.md"


def recipe(file, name):
    out, inside = [], False
    for line in (HERE / file).read_text().split("\n"):
        t = line.lstrip("#/ ")
        if inside:
            if t == "end recipe":
                return out
            out.append(line)
        elif t == "recipe: " + name:
            inside = True
    raise SystemExit(f"no recipe {name!r} in {file}")


def main():
    lines = DOC.read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        out.append(lines[i])
        m = re.fullmatch(r"<!-- recipe: (\S+) (.+) -->", lines[i])
        i += 1
        if not m:
            continue
        fence = "```" + {"py": "python", "js": "js", "java": "java"}[m.group(1).rsplit(".", 1)[1]]
        if i < len(lines) and lines[i].startswith("```"):  # drop the old block
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            i = j + 1
        out += [fence, *recipe(m.group(1), m.group(2)), "```"]
    DOC.write_text("\n".join(out))


if __name__ == "__main__":
    main()
