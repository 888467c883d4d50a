"""Schedule verifier: prove a schedule uses streamed weights safely.

Precondition: ``schedule`` is a schedule GraphModule (after :func:`~hscompile.passes.offload.offload`).

Postcondition: returns a :class:`ScheduleReport` if all of these hold, else raises
:class:`ScheduleError` naming the first violation:

1. No partition reads a weight placeholder of a group that the schedule fetches with
   ``wait_weights``: it must read the device buffer.
2. Every use of a group's device buffer (any partition reached from its ``wait_weights``
   through views) depends on that wait, and its ``release_weights`` depends on every use:
   these are paths in the dependency graph (data edges plus the program order of the
   ordered-effect ops), so they hold under any reordering that respects dependencies.
3. A streamed group is prefetched once, waited for once and released once, in that order;
   a group that is waited for without a prefetch is a resident buffer and is never released.
4. At no point are more groups prefetched and not yet released than the ring has slots.

The dependency graph is a ``networkx.DiGraph`` over schedule nodes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from .. import ops
from .partition import Partition

__all__ = ["ScheduleError", "ScheduleReport", "dependency_graph", "verify_schedule"]

_PREFETCH = ops.prefetch_weights._opoverload
_WAIT = ops.wait_weights._opoverload
_RELEASE = ops.release_weights._opoverload
_EFFECTS = (_PREFETCH, _WAIT, _RELEASE)
_VIEWS = (torch.ops.aten.view.dtype, torch.ops.aten.as_strided.default)


class ScheduleError(RuntimeError):
    """A schedule that could read a weight before it arrives, after its slot is reused, or overfill the ring."""


@dataclass(frozen=True, slots=True)
class ScheduleReport:
    """What the verifier established."""

    streamed_groups: tuple[int, ...]
    resident_groups: tuple[int, ...]
    max_in_flight: int
    checked_uses: int
    weight_bytes_per_call: int
    """Sum of the ``nbytes`` of every ``prefetch_weights``: what one call moves."""


def dependency_graph(schedule: fx.GraphModule) -> nx.DiGraph:
    """Data edges between schedule nodes, plus program order between ordered-effect ops."""
    graph = nx.DiGraph()
    previous_effect = None
    for node in schedule.graph.nodes:
        graph.add_node(node)
        for arg in node.all_input_nodes:
            graph.add_edge(arg, node)
        if node.op == "call_function" and node.target in _EFFECTS:
            if previous_effect is not None:
                graph.add_edge(previous_effect, node)
            previous_effect = node
    return graph


def _uses(wait: fx.Node) -> list[fx.Node]:
    """Steps that read the buffer ``wait`` returns (through view nodes), each once."""
    uses: dict[fx.Node, None] = {}
    stack = [wait]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user.op == "call_function" and user.target in _VIEWS:
                stack.append(user)
            elif user.op != "output":
                uses[user] = None
    return list(uses)


def verify_schedule(schedule: fx.GraphModule, ring_slots: int) -> ScheduleReport:
    """See the module docstring."""
    graph = dependency_graph(schedule)
    prefetches: dict[int, list[fx.Node]] = defaultdict(list)
    waits: dict[int, list[fx.Node]] = defaultdict(list)
    releases: dict[int, list[fx.Node]] = defaultdict(list)
    order = {node: i for i, node in enumerate(schedule.graph.nodes)}
    in_flight, max_in_flight, moved = 0, 0, 0
    for node in schedule.graph.nodes:
        if node.op != "call_function" or node.target not in _EFFECTS:
            continue
        group = node.args[0]
        if node.target is _PREFETCH:
            prefetches[group].append(node)
            moved += node.args[1]
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            if in_flight > ring_slots:
                raise ScheduleError(
                    f"{node.name}: prefetching layer {group} makes {in_flight} layers in flight, but the ring has "
                    f"{ring_slots} slot(s)"
                )
        elif node.target is _WAIT:
            waits[group].append(node)
        else:
            releases[group].append(node)
            in_flight -= 1

    fetched_hosts: dict[fx.Node, int] = {}
    checked = 0
    for group, group_waits in waits.items():
        if len(group_waits) != 1:
            raise ScheduleError(f"layer {group} is waited for {len(group_waits)} times; expected once per call")
        wait = group_waits[0]
        for host in wait.args[1]:
            fetched_hosts[host] = group
        streamed = group in prefetches
        if streamed:
            if len(prefetches[group]) != 1 or len(releases[group]) != 1:
                raise ScheduleError(
                    f"layer {group} is prefetched {len(prefetches[group])} and released {len(releases[group])} times; "
                    "a streamed layer is prefetched, waited for and released exactly once per call"
                )
            prefetch, release = prefetches[group][0], releases[group][0]
            if not order[prefetch] < order[wait] < order[release]:
                raise ScheduleError(f"layer {group}: prefetch, wait and release are out of order")
        elif releases[group]:
            raise ScheduleError(f"layer {group} is released but never prefetched")
        for use in _uses(wait):
            if not nx.has_path(graph, wait, use):  # pragma: no cover - a data edge implies it
                raise ScheduleError(f"{use.name} reads layer {group}'s weights without depending on its wait")
            if streamed and not nx.has_path(graph, use, releases[group][0]):
                raise ScheduleError(
                    f"{use.name} reads layer {group}'s weights but its release {releases[group][0].name} does not "
                    "depend on it: the slot could be reused while it still reads"
                )
            checked += 1
    for group in set(prefetches) - set(waits):
        raise ScheduleError(f"layer {group} is prefetched but never waited for")

    for node in schedule.graph.nodes:
        if node.op == "call_module" and isinstance(schedule.get_submodule(str(node.target)), Partition):
            for arg in node.all_input_nodes:
                if arg in fetched_hosts:
                    raise ScheduleError(
                        f"{node.name} reads {arg.name} from the host, but layer {fetched_hosts[arg]}'s weights are "
                        "fetched to the device: it must read the device buffer from wait_weights"
                    )
    return ScheduleReport(
        streamed_groups=tuple(sorted(prefetches)),
        resident_groups=tuple(sorted(set(waits) - set(prefetches))),
        max_in_flight=max_in_flight,
        checked_uses=checked,
        weight_bytes_per_call=moved,
    )
