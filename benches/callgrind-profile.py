#!/usr/bin/env python3
"""Where a request's instructions go, by component, from two callgrind dumps of the same proxy
run (a batch of N1 requests, then one of N2; benches/callgrind.sh keeps them with CALLGRIND_OUT):
per request = (dump N2 - dump N1) / (N2 - N1), so start-up and connection set-up drop out.

Every function's own instructions (self cost) are charged to the component of its nearest
ancestor that names one (COMPONENTS below, first match wins along the call chain), and shared
helpers (malloc, memcpy, hashing, fmt...) are split between their callers in proportion to the
instructions each call edge spent: callgrind keeps caller->callee edges, not whole stacks, so
that split is the one approximation here. Functions no component claims stay "other" under
their own crate. Unlike callgrind_annotate's inclusive column, nothing is counted twice
through recursion.

    benches/callgrind-profile.py DIR RUN          # DIR/RUN.n<N1>.callgrind and .n<N2>.callgrind
    benches/callgrind-profile.py DIR RUN --top 40 # also the top functions by self cost
"""

import argparse
import glob
import re
import sys
from collections import defaultdict

# (component, pattern on the demangled function name). Order matters: the first component
# found walking up from a function wins, so the narrower ones come first.
COMPONENTS = [
    ("pg_query parse (C parser + protobuf encode)", r"^pg_query_parse_protobuf_opts$"),
    ("pg_query protobuf decode (prost)", r"^prost::|as prost::message::Message>::merge|^pg_query::protobuf::.*::merge_field"),
    ("pg_query result free", r"^pg_query_free_protobuf_parse_result$|drop_in_place<pg_query::"),
    ("classifier: protobuf -> JSON Value (serde)", r"impl serde_core::ser::Serialize for pg_query::protobuf"),
    ("classifier: JSON walk", r"^capgate_pg::classify::classify_statement$"),
    ("classifier: rest (precheck, hand-off)", r"^capgate_pg::classify::"),
    ("guard: biscuit authorizer build", r"^biscuit_auth::token::builder::authorizer::AuthorizerBuilder::build$"),
    ("guard: Datalog run (authorize)", r"^biscuit_auth::token::authorizer::Authorizer::authorize$"),
    ("guard: authorizer drop", r"drop_in_place<biscuit_auth::token::authorizer::Authorizer>"),
    ("guard: policy builder clone", r"^capgate_core::policy::PolicySet::builder$"),
    ("guard: token cache, revocation, containment", r"^capgate_core::guard::Guard::token_check$|^capgate_core::guard::cache::|^capgate_core::guard::containment::check$"),
    ("guard: rest (facts, decision)", r"^capgate_core::guard::Guard::evaluate$|^capgate_core::guard::Guard::run_policy"),
    ("audit: decision event (JSON) + queue", r"^capgate_core::guard::decision_event$|Ledger>::record_later$"),
    ("audit: spool writer thread", r"^capgate_adapters::ledger::write_spool$"),
    ("audit: spool shipping to broker", r"^capgate_adapters::ledger::ship_spool"),
    ("audit: writes recorded at COMMIT (HTTP to broker)", r"Ledger>::audit_batch|Ledger>::audit\b|^capgate_client::"),
    ("decision log (tracing)", r"^capgate_core::guard::log_decision$"),
    ("sync with broker (keys, revocations)", r"^capgate_adapters::sync::"),
    ("hyper client pool (to the upstream, or to the broker)", r"^hyper_util::client::legacy::client::Client<.*>::(send_request|request|connection_for)"),
    ("HTTP proxy: screen, routes, path", r"^capgate_adapters::(screen|http::(routes|path))::"),
    ("HTTP proxy: handler rest", r"^capgate_adapters::(http::|extract_token|strip_token_headers)"),
    ("pg proxy: wire framing", r"^capgate_pg::wire::"),
    ("pg proxy: session rest", r"^capgate_pg::"),
    ("audit: records encoded as JSON text (AuditEvent serialize)", r"capgate_core::containment::audit::"),
    ("capgate: other", r"^<?capgate(_[a-z]+)?::"),
    ("HTTP/1 codec (hyper h1, httparse, http types)", r"^<?(hyper::proto|httparse|http)::"),
    ("axum router", r"^<?axum(_core)?::"),
    ("tokio runtime (scheduler, I/O driver, timers)", r"^<?tokio::"),
]
COMPILED = [(name, re.compile(pattern)) for name, pattern in COMPONENTS]
ALLOCATORS = {f"__rustc::__rust_{k}" for k in ("alloc", "alloc_zeroed", "realloc")} | {"malloc", "calloc", "realloc"}
# Generic code (serde_json's Value, its drop) named by who calls it: (caller, callee, component).
EDGE_COMPONENTS = [
    (r"^capgate_pg::classify::classify_here$", r"drop_in_place<serde_json::value::Value>", "classifier: JSON Value drop"),
    (r"^capgate_pg::classify::classify_here$", r"serde_json::value::|serde_core::ser::", "classifier: protobuf -> JSON Value (serde)"),
]
EDGE_COMPILED = [(re.compile(a), re.compile(b), name) for a, b, name in EDGE_COMPONENTS]


def edge_component(caller, callee):
    for a, b, name in EDGE_COMPILED:
        if a.search(caller) and b.search(callee):
            return name
    return None


def component_of(name):
    for component, pattern in COMPILED:
        if pattern.search(name):
            return component
    return None


def parse(path):
    """Self cost per function, inclusive cost per (caller, callee) edge, calls per callee."""
    names, self_cost, edges, calls = {}, defaultdict(int), defaultdict(int), defaultdict(int)
    edge_calls = defaultdict(int)
    current = callee = None
    pending_call = False
    total = 0
    with open(path) as f:
        for line in f:
            if line.startswith("summary:"):
                total = int(line.split()[1])
            if line.startswith(("fn=", "cfn=")):
                key, rest = line.rstrip("\n").split("=", 1)
                m = re.match(r"\((\d+)\)(?: (.*))?$", rest)
                if m:
                    if m.group(2) is not None:
                        names[m.group(1)] = m.group(2)
                    name = names[m.group(1)]
                else:
                    name = rest
                if key == "fn":
                    current = name
                else:
                    callee = name
                continue
            if line.startswith("calls="):
                count = int(line[6:].split()[0])
                calls[callee] += count
                edge_calls[(current, callee)] += count
                pending_call = True
                continue
            if line and (line[0].isdigit() or line[0] in "+-*"):
                parts = line.split()
                cost = int(parts[1]) if len(parts) > 1 else 0
                if pending_call:
                    edges[(current, callee)] += cost
                    pending_call = False
                else:
                    self_cost[current] += cost
    return total, self_cost, edges, calls, edge_calls


def diff(a, b):
    keys = set(a) | set(b)
    return {k: b.get(k, 0) - a.get(k, 0) for k in keys}


def attribute(self_cost, edges):
    """Component of each function's self cost, split over callers by edge weight.

    Recursion levels (callgrind's f'2) are one function, and each strongly connected group of
    the call graph (mutual recursion) takes its shares from the calls entering it from outside.
    """
    base = lambda fn: re.sub(r"'\d+$", "", fn)
    own_cost = defaultdict(float)
    for fn, cost in self_cost.items():
        own_cost[base(fn)] += cost
    graph = defaultdict(dict)  # callee -> {caller: weight}
    nodes = set(own_cost)
    for (caller, callee), cost in edges.items():
        a, b = base(caller), base(callee)
        nodes.update((a, b))
        if cost > 0 and a != b:
            graph[b][a] = graph[b].get(a, 0) + cost
    callees = defaultdict(list)
    for b, callers in graph.items():
        for a in callers:
            callees[a].append(b)
    group_of, groups = strongly_connected(nodes, callees)
    # Tarjan lists groups callees-first; callers must be settled before their callees.
    shares = {}
    for index in reversed(range(len(groups))):
        incoming = []
        for member in groups[index]:
            for caller, weight in graph.get(member, {}).items():
                if group_of[caller] != index:
                    incoming.append((caller, member, weight))
        total = sum(weight for _, _, weight in incoming)
        result = defaultdict(float)
        if total <= 0:
            result["other: " + crate(groups[index][0])] = 1.0
        for caller, member, weight in incoming if total > 0 else ():
            by_edge = edge_component(caller, member)
            for comp, frac in ({by_edge: 1.0} if by_edge else emitted(caller, shares, group_of)).items():
                result[comp] += frac * weight / total
        shares[index] = dict(result)
    by_component = defaultdict(float)
    members = defaultdict(lambda: defaultdict(float))
    for fn, cost in own_cost.items():
        if cost:
            for comp, frac in emitted(fn, shares, group_of).items():
                by_component[comp] += cost * frac
                members[comp][fn] += cost * frac
    return by_component, members, lambda fn: emitted(base(fn), shares, group_of)


def emitted(fn, shares, group_of):
    own = component_of(fn)
    return {own: 1.0} if own else shares[group_of[fn]]


def strongly_connected(nodes, successors):
    """Tarjan's algorithm, iteratively; groups come out callees-first."""
    index_of, low, on_stack, stack, groups, group_of = {}, {}, set(), [], [], {}
    counter = 0
    for root in nodes:
        if root in index_of:
            continue
        work = [(root, iter(successors.get(root, ())))]
        index_of[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index_of:
                    index_of[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(successors.get(child, ()))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index_of[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index_of[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group_of[member] = len(groups)
                    group.append(member)
                    if member == node:
                        break
                groups.append(group)
    return group_of, groups


# Cross-cutting costs, by their own instructions (self cost) wherever they are called from.
CROSS_CUTTING = [
    ("allocation (mimalloc, __rust_alloc/dealloc/realloc)", r"^_?mi_|__rust_(alloc|dealloc|realloc)|^alloc::raw_vec::"),
    ("memcpy / memmove / memcmp / strlen (libc)", r"^__(memcpy|memmove|memcmp|memset|strlen|memchr)|^(memcpy|memmove|memset)"),
    ("hashing (SipHash, hashbrown)", r"core::hash::|^hashbrown::|^<hashbrown::"),
    ("formatting (core::fmt)", r"^core::fmt::|as core::fmt::"),
    ("drop_in_place (destructors)", r"drop_in_place<"),
    ("tokio runtime (scheduler, I/O driver, timers)", r"^<?tokio::runtime::"),
]


def crate(fn):
    if fn in ("clone", "start_thread") or fn.endswith(":clone") or fn.endswith(":start_thread"):
        return "thread roots (tokio scheduler, parking, I/O driver)"
    fn = re.sub(r"^<", "", fn)
    if fn.startswith(("mi_", "_mi_")) or "__rust_alloc" in fn or "__rust_dealloc" in fn or "__rust_realloc" in fn:
        return "allocator (mimalloc)"
    if fn.startswith("./") or fn.startswith("0x"):
        return "libc/kernel entry"
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", fn)
    return m.group(1) if m else fn[:40]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("run")
    ap.add_argument("--top", type=int, default=0, help="also list the top functions by self cost")
    ap.add_argument("--component", help="list the functions charged to components containing this text")
    args = ap.parse_args()
    files = glob.glob(f"{args.dir}/{args.run}.n*.callgrind")
    runs = sorted((int(re.search(r"\.n(\d+)\.callgrind$", f).group(1)), f) for f in files)
    if len(runs) != 2:
        sys.exit(f"need exactly two dumps {args.dir}/{args.run}.n<N>.callgrind, found {len(runs)}")
    (n1, f1), (n2, f2) = runs
    t1, s1, e1, c1, ec1 = parse(f1)
    t2, s2, e2, c2, ec2 = parse(f2)
    n = n2 - n1
    self_cost = {k: v / n for k, v in diff(s1, s2).items()}
    edges = {k: v / n for k, v in diff(e1, e2).items()}
    total = (t2 - t1) / n
    by_component, members, component_shares = attribute(self_cost, edges)
    allocations_by = defaultdict(float)
    for (caller, callee), count in diff(ec1, ec2).items():
        if callee in ALLOCATORS and count > 0:
            for comp, frac in component_shares(caller).items():
                allocations_by[comp] += frac * count / n
    accounted = sum(by_component.values())
    counts = {k: v / n for k, v in diff(c1, c2).items()}
    allocations = sum(counts.get(f"__rustc::__rust_{k}", 0) for k in ("alloc", "alloc_zeroed", "realloc"))
    print(f"{args.run}: {total:,.0f} instructions per request (N1={n1}, N2={n2}); attributed {accounted:,.0f};"
          f" {allocations:,.0f} allocations (incl. reallocs), {counts.get('__rustc::__rust_dealloc', 0):,.0f} frees"
          f" and {counts.get('malloc', 0) + counts.get('calloc', 0):,.0f} C mallocs per request")
    print()
    print("| component | instructions / request | share | allocations / request |")
    print("|---|---:|---:|---:|")
    for comp, cost in sorted(by_component.items(), key=lambda kv: -kv[1]):
        if cost / total >= 0.002:
            print(f"| {comp} | {cost:,.0f} | {100 * cost / total:.1f}% | {allocations_by.get(comp, 0):,.0f} |")
    small = [c for c, cost in by_component.items() if cost / total < 0.002]
    rest = sum(by_component[c] for c in small)
    print(f"| (smaller items) | {rest:,.0f} | {100 * rest / total:.1f}% | {sum(allocations_by.get(c, 0) for c in small):,.0f} |")
    print()
    print("Cross-cutting, by own instructions wherever called (overlaps the table above):")
    print()
    print("| cost | instructions / request | share |")
    print("|---|---:|---:|")
    for label, pattern in CROSS_CUTTING:
        cost = sum(c for fn, c in self_cost.items() if re.search(pattern, fn))
        print(f"| {label} | {cost:,.0f} | {100 * cost / total:.1f}% |")
    if args.component:
        for comp in sorted(c for c in members if args.component in c):
            print()
            print(f"{comp}: {by_component[comp]:,.0f}")
            for fn, cost in sorted(members[comp].items(), key=lambda kv: -kv[1])[: args.top or 30]:
                print(f"  {cost:10,.0f}  {fn[:150]}")
    if args.top and not args.component:
        print()
        print("| function (self cost) | instructions / request | share |")
        print("|---|---:|---:|")
        for fn, cost in sorted(self_cost.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"| `{fn[:110]}` | {cost:,.0f} | {100 * cost / total:.1f}% |")


if __name__ == "__main__":
    main()
