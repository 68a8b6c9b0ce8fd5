"""A YAML loader for files written by people and read by a root daemon: strict where YAML 1.1 is surprising.

- Duplicate keys are an error (PyYAML keeps the last one silently: two `web:` services would merge).
- Anchors and aliases are allowed, but a document whose aliases expand to more than MAX_NODES nodes is refused
  before anything is constructed (a "billion laughs" document is a few lines that expand to 10^9 nodes), and so
  is an alias inside the value it names (`x: &x [*x]`: a value without end, which would spin every reader).
- No sexagesimal numbers: YAML 1.1 reads an unquoted `18:00` as the integer 1080, which turned
  `listen: 18:00` into port 1080 on every interface. Here it stays the string "18:00".
- Only the safe tags (SafeLoader): nothing in the file can construct Python objects.
- YAML 1.1 reads unquoted yes/no/on/off as booleans, YAML 1.2 (and so docker compose) as words. They are
  booleans here, but a mapping or list that holds one is a WordMap or WordList that remembers each such value's
  word (words_of), so a reader with YAML 1.2's rules (the Compose translation) can take the word back.

Errors are LoadError with a one-line message and, when known, the line and column.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

#: more nodes than any sensible services file has, far fewer than an alias bomb expands to
MAX_NODES = 100_000
#: the file itself; a services file is a few KiB
MAX_BYTES = 4 * 2**20


class LoadError(ValueError):
    def __init__(self, problem: str, mark: Any = None) -> None:
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        super().__init__(f"{problem}{at}")


#: the YAML 1.1 booleans that YAML 1.2 reads as plain words
YAML11_BOOL_WORDS = frozenset({"yes", "no", "on", "off"})


class WordMap(dict[Any, Any]):
    """A mapping some of whose values were written as yes/no/on/off: `words` maps their keys to the words."""

    words: dict[Any, str]


class WordList(list[Any]):
    """A list some of whose items were written as yes/no/on/off: `words` maps their indexes to the words."""

    words: dict[int, str]


def words_of(container: Any) -> dict[Any, str]:
    """Which values of a loaded mapping or list were yes/no/on/off words (key or index -> the word as written)."""
    return dict(getattr(container, "words", {}))


def _word(node: Node) -> str | None:
    if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:bool" and node.style is None \
            and str(node.value).lower() in YAML11_BOOL_WORDS:
        return str(node.value)
    return None


class _Loader(yaml.SafeLoader):
    def compose_document(self) -> Node | None:
        node: Node | None = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden by explicit keys; that is not a duplicate
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise LoadError(f"duplicate key '{key}' (first at line {seen[key].line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark
            except TypeError:
                raise LoadError("a mapping key must be a plain value", key_node.start_mark) from None
        return super().construct_mapping(node, deep=deep)

    def construct_word_map(self, node: MappingNode) -> Any:
        data: dict[Any, Any] = {}
        if any(_word(v) for _, v in node.value) or any(k.tag == "tag:yaml.org,2002:merge" for k, _ in node.value):
            data = WordMap()
        yield data
        data.update(self.construct_mapping(node))
        if isinstance(data, WordMap):  # after construct_mapping: node.value then holds the merged (<<) pairs too
            data.words = {self.construct_object(k, deep=True): w for k, v in node.value if (w := _word(v))}

    def construct_word_list(self, node: SequenceNode) -> Any:
        data: list[Any] = WordList() if any(_word(v) for v in node.value) else []
        yield data
        data.extend(self.construct_sequence(node))
        if isinstance(data, WordList):
            data.words = {i: w for i, v in enumerate(node.value) if (w := _word(v))}


def _check_expansion(root: Node) -> None:
    """Count the nodes the document expands to, without expanding it (aliases share node objects), and refuse
    an alias inside the value it names (`x: &x [*x]`): a value that contains itself never ends."""
    sizes: dict[int, int] = {}
    # The nodes being expanded: in this post-order walk, exactly the ancestors of the node at hand, so meeting
    # one again is a cycle.
    open_: set[int] = set()
    # Iterative post-order walk: a deeply nested document must not hit Python's recursion limit here.
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        if not done and id(node) in open_:
            raise LoadError("an alias refers to a value that contains it, so the value never ends; write the "
                            "value out", node.start_mark)
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        if not done:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        open_.discard(id(node))
        total = 1 + sum(sizes.get(id(c), 1) for c in children)
        if total > MAX_NODES:
            raise LoadError(f"the document expands to more than {MAX_NODES} values through its aliases "
                            "(an alias bomb?); write the values out or use fewer aliases", node.start_mark)
        sizes[id(node)] = total


# YAML 1.2-style numbers: the 1.1 resolvers with their sexagesimal (base 60) alternatives removed.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_word_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _Loader.construct_word_list)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def load(text: str) -> Any:
    if len(text) > MAX_BYTES:
        raise LoadError(f"the file is larger than {MAX_BYTES // 2**20} MiB; a services file is a few KiB")
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        problem = e.problem or e.context or "malformed YAML"
        if "'\\t'" in problem:  # PyYAML's words for a tab where indentation or a token should be
            problem = "a tab character; YAML is indented with spaces, not tabs (replace the tab with spaces)"
        raise LoadError(f"malformed YAML: {problem}", e.problem_mark) from None
    except yaml.YAMLError as e:
        raise LoadError(f"malformed YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise LoadError("the document is nested too deeply") from None

