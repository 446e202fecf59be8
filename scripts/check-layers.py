#!/usr/bin/env python3
"""Fails when the hub's modules import each other in a cycle.

Each .rs file under the crate's source folder is a node (`a/mod.rs` is module `a`, `a/b.rs` is `a::b`, lib.rs
is the crate root `crate`). An edge A -> B means a file of A names a path into B:

- `use crate::...` trees (groups included: `use crate::{a, b::{C, D}};`), and `crate::x::y` anywhere in code;
- `super::...` and `self::...` paths, resolved from the module they appear in;
- `use child::...` where `child` is a module the file declares with `mod child;`.

A path resolves to the deepest module file that exists (`crate::a::b::C` is `a::b` when a/b.rs exists, else `a`).
A file's own paths into itself are not edges.

Ignored, so that they cannot make or hide a cycle:
- items under `#[cfg(test)]` (the `mod tests { ... }` block, or a `mod tests;` file with everything below it);
- comments, string and char literals;
- main.rs when lib.rs exists (the binary is another crate: the library cannot import it), and src/bin/.

Exit status: 0 and the layer order of the top-level modules (a topological order: each one uses only those
printed before it), or 1 and every cycle found, one per line as `a -> b -> c -> a`, each followed by where
each step is imported. 2 on bad arguments.

    python3 scripts/check-layers.py [--root SRC_DIR]      (default: src/ of this repository)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict, deque

ROOT_NAME = "crate"


def strip_comments_and_strings(text: str) -> str:
    """Blanks comments and literals, keeping every newline so line numbers still match."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        nxt = text[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":
            while i < n and text[i] != "\n":
                i += 1
        elif c == "/" and nxt == "*":
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    out.append("\n" if text[i] == "\n" else " ")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = len(re.match(r"r(#*)", text[i:]).group(1))
            end = text.find('"' + "#" * hashes, i + 2 + hashes)
            end = n if end < 0 else end + 1 + hashes
            out.append("".join("\n" if ch == "\n" else " " for ch in text[i:end]))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append("".join("\n" if ch == "\n" else " " for ch in text[i : j + 1]))
            i = j + 1
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}'); a lifetime ('a) has no closing quote right after.
            m = re.match(r"'(\\(u\{[0-9a-fA-F]+\}|x[0-9a-fA-F]{2}|.)|[^\\'])'", text[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching_brace(text: str, open_at: int) -> int:
    """Index of the `}` closing the `{` at `open_at` (or the end of the text)."""
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return len(text) - 1


CFG_TEST = re.compile(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")
ATTRIBUTE = re.compile(r"\s*#\s*\[[^\]]*\]")
OUTLINE_MOD = re.compile(r"\s*(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+(\w+)\s*;")


def drop_test_items(text: str) -> tuple[str, set[str]]:
    """Blanks every item under `#[cfg(test)]`; returns the text and the `mod x;` files so excluded."""
    test_mods = set()
    while True:
        m = CFG_TEST.search(text)
        if not m:
            return text, test_mods
        j = m.end()
        while a := ATTRIBUTE.match(text, j):  # further attributes of the same item
            j = a.end()
        if o := OUTLINE_MOD.match(text, j):
            test_mods.add(o.group(1))
        # The item ends at its first `;` or at the brace closing its first `{`, whichever comes first.
        semi, brace = text.find(";", j), text.find("{", j)
        if brace >= 0 and (semi < 0 or brace < semi):
            end = matching_brace(text, brace) + 1
        else:
            end = (semi if semi >= 0 else len(text) - 1) + 1
        blank = "".join("\n" if ch == "\n" else " " for ch in text[m.start() : end])
        text = text[: m.start()] + blank + text[end:]


def expand_use_tree(tree: str) -> list[str]:
    """`a::{b, c::{d, e}, self}` -> ["a::b", "a::c::d", "a::c::e", "a"]."""
    tree = re.sub(r"\s+", "", tree)
    brace = tree.find("{")
    if brace < 0:
        return [tree]
    prefix, inner = tree[:brace], tree[brace + 1 : tree.rfind("}")]
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(inner):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:k])
            start = k + 1
    parts.append(inner[start:])
    paths = []
    for part in parts:
        if not part:
            continue
        for sub in expand_use_tree(part):
            paths.append((prefix + sub) if sub != "self" else prefix.rstrip(":"))
    return paths


def use_paths(statement: str) -> list[str]:
    """Paths named by one `use` statement's tree; aliases go first (without spaces `a as b` reads as one name)."""
    statement = re.sub(r"\s+as\s+\w+", "", statement)
    return [p for p in expand_use_tree(statement) if p]


class Crate:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.files: dict[tuple[str, ...], str] = {}  # module path -> file
        self.excluded: set[str] = set()
        names = {}
        for folder, dirs, files in os.walk(self.root):
            dirs.sort()
            rel = os.path.relpath(folder, self.root)
            parts = () if rel == "." else tuple(rel.split(os.sep))
            if parts[:1] == ("bin",):
                continue
            for name in sorted(files):
                if not name.endswith(".rs"):
                    continue
                if parts == () and name in ("lib.rs", "main.rs"):
                    module = ()
                elif name == "mod.rs":
                    module = parts
                else:
                    module = parts + (name[:-3],)
                names.setdefault(module, []).append(os.path.join(folder, name))
        for module, paths in names.items():
            if module == ():
                lib = [p for p in paths if p.endswith("lib.rs")]
                self.files[module] = (lib or paths)[0]
            else:
                self.files[module] = paths[0]

    def resolve(self, segments: list[str]) -> tuple[str, ...]:
        """The deepest existing module on the path."""
        best = ()
        for k in range(1, len(segments) + 1):
            if tuple(segments[:k]) in self.files:
                best = tuple(segments[:k])
            else:
                break
        return best


def name(module: tuple[str, ...]) -> str:
    return "::".join(module) if module else ROOT_NAME


INLINE_MOD = re.compile(r"\b(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+(\w+)\s*\{")
PATH = re.compile(r"(?<![\w:])((?:crate|super|self)(?:\s*::\s*(?:\w+|\{))+)")
USE = re.compile(r"(?<![\w:])use\s+([^;]+);")


def scan(crate: Crate):
    """Edges: {(from, to): [(file, line, text)]}, and the modules excluded as test-only."""
    edges = defaultdict(list)
    test_only = set()
    # Outline `#[cfg(test)] mod x;` files are excluded with everything below them.
    sources = {}
    for module, path in crate.files.items():
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        text, test_mods = drop_test_items(strip_comments_and_strings(raw))
        sources[module] = text
        test_only.update(module + (m,) for m in test_mods)

    def is_test(module):
        return any(module[: k + 1] in test_only for k in range(len(module)))

    for module, text in sources.items():
        if is_test(module):
            continue
        path = crate.files[module]
        declared = set(re.findall(r"\bmod\s+(\w+)\s*;", text))
        # Inline modules (`mod close { ... }`): their `super::`/`self::` start one level deeper.
        inline = []
        for m in INLINE_MOD.finditer(text):
            brace = m.end() - 1
            inline.append((brace, matching_brace(text, brace), m.group(1)))

        def scope(at):
            return module + tuple(n for start, end, n in inline if start < at < end)

        def add(at, segments, evidence):
            here = scope(at)
            if segments[0] == "crate":
                absolute = segments[1:]
            elif segments[0] in ("self", "super"):
                absolute = list(here)
                k = 0
                while k < len(segments) and segments[k] in ("self", "super"):
                    if segments[k] == "super":
                        if not absolute:
                            return  # `super` above the crate root: not a crate module
                        absolute.pop()
                    k += 1
                absolute += segments[k:]
            elif len(here) == len(module) and segments[0] in declared:
                absolute = list(module) + segments
            else:
                return  # an external crate, std, or a name in scope
            target = crate.resolve(absolute)
            if target != module and not is_test(target):
                line = text.count("\n", 0, at) + 1
                edges[(module, target)].append((os.path.relpath(path), line, evidence))

        use_spans = []
        for m in USE.finditer(text):
            use_spans.append((m.start(), m.end()))
            statement = m.group(1).strip()
            for p in use_paths(statement):
                segments = [s for s in p.split("::") if s]
                if segments and segments[0] != "*":
                    segments = [s for s in segments if s != "*"]
                    add(m.start(), segments, "use " + re.sub(r"\s+", " ", statement) + ";")
        for m in PATH.finditer(text):
            if any(start <= m.start() < end for start, end in use_spans):
                continue
            segments = [s for s in re.sub(r"\s+", "", m.group(1)).split("::") if s and s != "{"]
            add(m.start(), segments, re.sub(r"\s+", "", m.group(1)).rstrip(":{"))
    return edges, {module for module in sources if is_test(module)}


def strongly_connected(nodes, graph):
    """Tarjan's algorithm, iterative; components in reverse topological order."""
    index, low, on_stack, stack, result = {}, {}, set(), [], []
    counter = 0
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                result.append(sorted(component))
    return result


def shortest_cycle(start, graph, members):
    """The shortest cycle through `start` inside one component (breadth first)."""
    previous = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return None


def cycles(nodes, graph):
    """One shortest cycle through each module of every cyclic component, without repeats."""
    found, seen = [], set()
    for component in strongly_connected(nodes, graph):
        if len(component) < 2:
            continue
        members = set(component)
        for node in component:
            cycle = shortest_cycle(node, graph, members)
            if not cycle:
                continue
            # The same cycle from another starting point: rotate to its smallest member to compare.
            ring = cycle[:-1]
            k = ring.index(min(ring))
            key = tuple(ring[k:] + ring[:k])
            if key not in seen:
                seen.add(key)
                found.append(list(key) + [key[0]])
    return found


def layer_order(nodes, graph):
    """A topological order, dependencies first; ties broken by name so the output is stable."""
    users = defaultdict(set)
    pending = {node: len(graph[node]) for node in nodes}
    for node in nodes:
        for dep in graph[node]:
            users[dep].add(node)
    ready = sorted(node for node, count in pending.items() if count == 0)
    order = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for user in sorted(users[node]):
            pending[user] -= 1
            if pending[user] == 0:
                ready.append(user)
        ready.sort()
    return order


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description="Fails when the hub's modules import each other in a cycle.")
    parser.add_argument("--root", default=os.path.join(here, "..", "src"), help="the crate's source folder")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"check-layers: {args.root} is not a folder", file=sys.stderr)
        return 2
    crate = Crate(args.root)
    if not crate.files:
        print(f"check-layers: no .rs files under {args.root}", file=sys.stderr)
        return 2
    edges, test_only = scan(crate)
    nodes = set(crate.files) - test_only
    graph = defaultdict(set)
    for (source, target) in edges:
        graph[source].add(target)

    found = cycles(nodes, graph)
    if found:
        print(f"check-layers: {len(found)} import cycle(s) between modules of {os.path.relpath(args.root)}:")
        for cycle in found:
            print("  " + " -> ".join(name(m) for m in cycle))
            for source, target in zip(cycle, cycle[1:]):
                file, line, evidence = edges[(source, target)][0]
                print(f"      {name(source)} -> {name(target)}: {file}:{line}: {evidence}")
        return 1

    # Top-level modules (the crate root apart): an edge between two files is an edge between their tops.
    tops = {m[0] for m in nodes if m}
    top_graph = defaultdict(set)
    for (source, target) in edges:
        if source and target and source[0] != target[0]:
            top_graph[source[0]].add(target[0])
    top_cycles = cycles(tops, top_graph)
    total = sum(len(v) for v in graph.values())
    print(f"check-layers: no cycles among {len(nodes)} module files ({total} imports between them)")
    if top_cycles:
        # Acyclic files can still make cyclic folders (a::x -> b::y -> a::z): no layer order then.
        print("top-level modules depend on each other in a ring, so they have no layer order:")
        for cycle in top_cycles:
            print("  " + " -> ".join(cycle))
        return 0
    order = layer_order(tops, top_graph)
    print("layer order (each top-level module uses only modules listed before it):")
    for top in order:
        uses = ", ".join(sorted(top_graph[top])) or "-"
        print(f"  {top:<16} uses: {uses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
