"""Data-flow facts over a captured FX graph: which user inputs each node depends on, module membership."""

from __future__ import annotations

from collections import defaultdict

from torch import fx


def input_dependencies(graph: fx.Graph, user_inputs: list[str]) -> dict[fx.Node, frozenset[str]]:
    """Return, for every node, the set of user-input placeholders it (transitively) depends on."""
    deps: dict[fx.Node, frozenset[str]] = {}
    users = set(user_inputs)
    for node in graph.nodes:
        if node.op == "placeholder":
            deps[node] = frozenset({node.name}) if node.name in users else frozenset()
        else:
            acc: set[str] = set()
            for arg in node.all_input_nodes:
                acc |= deps[arg]
            deps[node] = frozenset(acc)
    return deps


def module_nodes(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Return the call nodes run inside each module path (a node counts for all enclosing modules)."""
    members: dict[str, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for path, _type in stack.values():
            if path:
                members[path].append(node)
    return dict(members)


def timestep_only_modules(graph: fx.Graph, user_inputs: list[str], timestep: str, layer_nodes: set[str],
                          min_fanout: int = 2) -> list[str]:
    """Return the outermost modules that hold a layer, depend only on `timestep`, and whose result is
    shared by at least `min_fanout` consumers outside them (a time embedding, not a per-block projection).
    """
    deps = input_dependencies(graph, user_inputs)
    only_t = frozenset({timestep})
    chosen: list[str] = []
    for path, nodes in sorted(module_nodes(graph).items(), key=lambda kv: kv[0].count(".")):
        if any(path.startswith(c + ".") for c in chosen):
            continue
        if not any(n.name in layer_nodes for n in nodes):
            continue
        if any(not deps[n] <= only_t for n in nodes) or not any(deps[n] == only_t for n in nodes):
            continue
        inside = set(nodes)
        outside_users = {u for n in nodes for u in n.users if u not in inside}
        if len(outside_users) >= min_fanout:
            chosen.append(path)
    return chosen


def module_outputs(graph: fx.Graph, path: str) -> list[fx.Node]:
    """Return the nodes of module `path` that are used outside it."""
    nodes = module_nodes(graph).get(path, [])
    inside = set(nodes)
    return [n for n in nodes if any(u not in inside for u in n.users)]
